"""Export to Hugging Face transformers: weights (export), tokenizer, model card, and the standalone model code it ships."""
