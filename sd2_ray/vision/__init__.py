"""Vision-language targets and MASSV multimodal drafters."""
