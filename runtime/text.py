"""Prompt encoding for FLUX.1 (CLIP pooled + T5 sequence), in PyTorch, as ``FluxPipeline`` does it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from deleaker.entities import entity_token_mask

from .request import PromptError

Tensor = torch.Tensor


@dataclass
class TextEncoders:
    """CLIP (pooled embedding) and T5 (token embeddings) with their tokenizers; modules stay where the caller put them.

    ``encode`` returns what ``FluxPipeline.encode_prompt`` returns for one prompt: ``prompt_embeds (1, T, joint_dim)``
    and ``pooled_projections (1, pooled_dim)``. The encoders run once per prompt: the last `KEPT_EMBEDDINGS`
    prompts' outputs are kept, so a ``--compare`` pair (DeLeaker on, then plain FLUX) and repeated prompts share
    them.

    ``offload_to``: a device (a GPU) the encoders are moved to for each encoding and moved back from afterwards
    (they live where the caller put them, e.g. the CPU), so the GPU holds them only while a prompt is encoded;
    None keeps them in place.
    """

    tokenizer: object
    text_encoder: torch.nn.Module
    tokenizer_2: object
    text_encoder_2: torch.nn.Module
    offload_to: Optional[torch.device] = None
    #: The last prompts' T5 encodings (`t5_encoding`), oldest first.
    _t5_encodings: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    #: The last prompts' encoder outputs, by (prompt, T, dtype), oldest first.
    _embeddings: dict[tuple, tuple[Tensor, Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

    #: How many prompts' T5 encodings are kept (a batch's prompts, each checked, masked and embedded).
    KEPT_ENCODINGS = 64
    #: How many prompts' encoder outputs are kept (T5-XXL at T = 512 in bf16: 4 MiB each).
    KEPT_EMBEDDINGS = 16

    def t5_encoding(self, prompt: str) -> Any:
        """``prompt``'s one T5 tokenization (untruncated, with character offsets): the length check, the entity
        mask and the embedding all read it, so a prompt is tokenized once however often a request is checked."""
        encoding = self._t5_encodings.get(prompt)
        if encoding is None:
            encoding = self.tokenizer_2(prompt, truncation=False, return_offsets_mapping=True, verbose=False)
            while len(self._t5_encodings) >= self.KEPT_ENCODINGS:
                self._t5_encodings.pop(next(iter(self._t5_encodings)), None)
            self._t5_encodings[prompt] = encoding
        return encoding

    def t5_token_count(self, prompt: str) -> int:
        """Tokens T5 sees for ``prompt``, end-of-sequence included (what must fit in ``T``)."""
        return len(self.t5_encoding(prompt).input_ids)

    def check_prompt(self, prompt: str, text_len: int) -> None:
        """Raise `PromptError` when ``prompt`` has more T5 tokens than ``text_len`` (FluxPipeline would truncate)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt must be a non-empty string")
        count = self.t5_token_count(prompt)
        if count > text_len:
            raise PromptError(
                f"the prompt has {count} T5 tokens but the model takes at most {text_len} "
                f"(max_sequence_length); shorten the prompt"
            )

    def entity_mask(self, prompt: str, entities: Sequence[str], *, text_len: int, max_entities: int) -> Tensor:
        """``(max_entities, text_len)`` bool: each entity's T5 tokens (raises `EntityError` naming the entity)."""
        return entity_token_mask(
            self.tokenizer_2, prompt, list(entities), max_sequence_length=text_len, max_entities=max_entities,
            encoding=self.t5_encoding(prompt),
        )

    def encode(self, prompt: str, *, text_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(prompt_embeds (1, T, joint_dim), pooled (1, pooled_dim))`` for one prompt, cast to ``dtype``; the
        encoders run only for a prompt not among the last `KEPT_EMBEDDINGS` (callers must not modify the result)."""
        key = (prompt, text_len, dtype)
        kept = self._embeddings.get(key)
        if kept is None:
            if self.offload_to is None:
                kept = self._run_encoders(prompt, text_len=text_len, dtype=dtype)
            else:
                homes = [next(m.parameters()).device for m in (self.text_encoder, self.text_encoder_2)]
                try:
                    for module in (self.text_encoder, self.text_encoder_2):
                        module.to(self.offload_to)
                    kept = self._run_encoders(prompt, text_len=text_len, dtype=dtype)
                finally:
                    for module, home in zip((self.text_encoder, self.text_encoder_2), homes):
                        module.to(home)
            while len(self._embeddings) >= self.KEPT_EMBEDDINGS:
                self._embeddings.pop(next(iter(self._embeddings)), None)
            self._embeddings[key] = kept
        return kept

    @torch.no_grad()
    def _run_encoders(self, prompt: str, *, text_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        clip_ids = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        clip_device = next(self.text_encoder.parameters()).device
        pooled = self.text_encoder(clip_ids.to(clip_device), output_hidden_states=False).pooler_output
        ids = self.t5_encoding(prompt).input_ids
        if len(ids) <= text_len:  # FluxPipeline's padded ids, from the prompt's one tokenization
            t5_ids = self.tokenizer_2.pad(
                {"input_ids": [ids]}, padding="max_length", max_length=text_len, return_tensors="pt"
            ).input_ids
        else:  # longer than T (the runtime refuses such prompts first): FluxPipeline truncates
            t5_ids = self.tokenizer_2(
                [prompt], padding="max_length", max_length=text_len, truncation=True, return_tensors="pt"
            ).input_ids
        t5_device = next(self.text_encoder_2.parameters()).device
        embeds = self.text_encoder_2(t5_ids.to(t5_device), output_hidden_states=False)[0]
        # FluxPipeline casts the pooled output to CLIP's dtype and the sequence to T5's; the backend then takes
        # them in the transformer's dtype.
        pooled = pooled.to(self.text_encoder.dtype).to(dtype)
        embeds = embeds.to(self.text_encoder_2.dtype).to(dtype)
        return embeds, pooled
