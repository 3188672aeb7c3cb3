"""File formats: reading and naming what steps write (Hugging Face dirs, genai folders, data set
files, fine-tune outputs). Standard library only; heavy readers are imported inside functions."""
