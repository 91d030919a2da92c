"""The pure maths of EFT: request specs and their validation, the combination of role
log-probs, sampling distributions, the exact speculative acceptance rule, stop conditions and
the shared-vocabulary check. No models, no I/O, no event loop: everything here is a function
of tensors and specs, batched over rows so that one call serves every request of a step."""
