"""Text to token ids and prompt structure: the CLIP BPE tokenizer (clip_tokenizer), A1111 prompt syntax with
weights, 75-token chunks, BREAK and extra-network tags (prompts), prompt editing schedules (editing), and
textual-inversion embeddings (embeddings).

May import runtime, formats, models and families. Must never import sampling, loading, control, output, pipeline
or app: the text side knows nothing of how a prompt is sampled or saved.
"""
