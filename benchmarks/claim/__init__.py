"""The claim experiment (issue 7): does answer-guided sampling make GRPO learn faster? See PROTOCOL.md."""
