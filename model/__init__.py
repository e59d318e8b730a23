"""The lean trainer's models: Stage 1 (masked feature transformer), Stage 2 (DiT), diffusion and data.

Nothing under ``model/`` imports ``transformers``, ``diffusers``, ``ray`` or ``pipeline.encoders``:
the trainer streams cached features and latents and never loads a frozen encoder.
"""
