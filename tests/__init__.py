"""The test suite; its shared factories (store_factory, run_factory, fake_datasets) import as tests.*."""
