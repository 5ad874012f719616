"""pgp_peft: Prompt Gradient Projection continual learning on the Hugging Face stack."""

__version__ = "0.1.0"
