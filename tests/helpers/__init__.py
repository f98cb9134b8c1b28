"""Helpers shared by the test modules: brute-force float64 references (`reference`), the inputs of the
fused sampling backends (`kernel_inputs`), a read-only vLLM logits processor (`vllm_observer`), and the check
of a rollout's records against teacher-forced scores (`rollouts`)."""
