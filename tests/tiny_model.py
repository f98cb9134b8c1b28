"""A tiny fp32 Llama with a locally trained tokenizer, saved to a directory both HF and vLLM load from.

No model hub: the tokenizer is a byte-level BPE trained with the `tokenizers` library on a few sentences,
the model is a randomly initialised 2-layer Llama. Its output layer is scaled up so next-token
distributions are peaked (a near-uniform model would make every test of "which token" vacuous), and the
hint visibly moves them (the model attends over the whole context).
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "What is 2+3? The answer is 5.",
    "Compute 7 times 6. The result is 42.",
    "Name the capital of France. It is Paris.",
    "Solve for x: x + 4 = 9. So x = 5.",
    "(Hint: the correct final answer is 12.)",
    "Think step by step, then give the final answer in a box.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def build_tiny_model(directory: str | Path, *, seed: int = 0, logit_scale: float = 12.0) -> Path:
    """Write config, fp32 weights and tokenizer files into `directory` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(directory)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    return directory
