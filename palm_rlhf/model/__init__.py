"""What the weights compute: the PaLM decoder's layers, the decoder with its KV cache, LoRA
scopes on one frozen base, and the reward model (a trunk with scalar/rating heads). No devices,
no optimisers, no losses beyond the language-model loss the decoder reports."""
