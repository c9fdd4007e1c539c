"""Bytes on disk, below everything else: atomic file and directory writes, safetensors read and
written tensor by tensor, model checkpoint directories (JSON configs + weights), and the
line-numbered text/JSONL readers whose errors name the file and line. Nothing here unpickles,
and nothing here knows what a model or a stage is."""
