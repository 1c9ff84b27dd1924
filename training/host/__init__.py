"""The host side: finding ComfyUI, loading checkpoints with it, prompt and image data, data-free trajectories."""
