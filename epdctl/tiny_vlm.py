"""`python -m epdctl.tiny_vlm OUT_DIR`: a tiny, real Qwen2.5-VL model folder, built offline.

For trying a real EPD topology (and testing one in CI) on a machine with no GPU and no access
to model hubs. It is a real model — vLLM loads and runs it, vision tower included — with seeded
random weights, so its answers are gibberish but deterministic: the same image and prompt give
the same tokens at temperature 0, which is what comparing EPD with aggregated output needs.
(`--load-format dummy` would not do: all logits come out equal.)

Needs the `vllm` extra (torch, transformers, tokenizers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Qwen's special tokens, in Qwen2.5-VL's order; their ids follow the trained vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
VOCAB_SIZE = 640
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A picture shows a cat on a red sofa near a window. "
    "Describe the image in one sentence. What colour is the sky? There are three apples on the table. "
    "You are a helpful assistant. The encoder turns pixels into tokens; the decoder writes the answer. "
    "0123456789 !?.,;:'\"()[]{}<>/\\|-_=+*&^%$#@~` "
)


def build(out: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor)

    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([CORPUS] * 50, trainer=trainer)
    bpe.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token=None, model_max_length=4096)
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    # The embedding is exactly as large as the tokenizer: every id the model can emit decodes to
    # text, so an answer is never "" made of ids past the vocabulary (the BPE trainer learns fewer
    # than VOCAB_SIZE tokens from this corpus).
    vocab = len(tokenizer)
    assert vocab <= VOCAB_SIZE, vocab

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "rms_norm_eps": 1e-6,
        },
        vision_config={
            "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)

    # Small images keep the vision tower's work (and CPU time) tiny: at most 64 patches.
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16,
                                            patch_size=14, merge_size=2, temporal_patch_size=2)
    try:
        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=CHAT_TEMPLATE)
        processor.save_pretrained(out)
    except Exception:
        # Without a video processor (torchvision) the processor cannot be built; save the parts.
        tokenizer.save_pretrained(out)
        image_processor.save_pretrained(out)
    generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                  "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epdctl.tiny_vlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="The model folder to write (created if missing).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "tokenizers")):
        print("epdctl.tiny_vlm needs torch and transformers: pip install 'epdctl[vllm]'", file=sys.stderr)
        return 2
    path = build(args.out, args.seed)
    print(f"wrote a tiny Qwen2.5-VL to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
