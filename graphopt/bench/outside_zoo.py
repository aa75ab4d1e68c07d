"""Architectures outside the zoo, for checking ``tune`` and the lowerings on models they were not built on.

``graphopt bench --outside`` (or any of the names below) measures them like zoo models. They are
transformers configs with random weights, chosen because their graphs differ from the zoo's: a
T5 encoder (RMS norms, relative position bias, no scaled attention), ALBERT (one layer's
weights shared by every layer, factorised embeddings), RoBERTa and DistilBERT (BERT variants),
a Llama stack used as an encoder (rotary, grouped key/value heads, SwiGLU), ConvNeXt (depthwise
7x7 convolutions, layer norms over channels) and Swin (shifted windows, a learned bias as the
attention mask). ``"full"`` is the size the edge-runtime issue measured them at (4 layers of
width 256, 64 tokens; image models at 224x224), not the published base sizes, which would take
minutes per backend on a 2-core machine; ``"small"`` is for tests.
"""

from __future__ import annotations

from torch import nn

from graphopt.bench.model_parts import Built, LastHiddenState, images, token_inputs

__all__ = ["OUTSIDE_MODELS"]

TEXT_TOKENS = {"small": 16, "full": 64}
"""Tokens per example sentence (odd rows pad their last quarter, as the zoo's text models do)."""


def _text(size: str) -> dict[str, int]:
    """A 4-layer, 256-wide stack ("full") or a 2-layer, 64-wide one ("small"), in BERT-style config names."""
    if size == "full":
        return dict(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    return dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2)


def _encoder(model: nn.Module, size: str, batch: int, vocab: int, description: str) -> Built:
    seq = TEXT_TOKENS[size]
    return LastHiddenState(model), token_inputs(batch, seq, vocab, True), f"{description}, seq {seq}"


def _distilbert(size: str, batch: int) -> Built:
    from transformers import DistilBertConfig, DistilBertModel

    shape = _text(size)
    config = DistilBertConfig(vocab_size=1000, n_layers=shape["num_hidden_layers"], dim=shape["hidden_size"],
                              hidden_dim=shape["intermediate_size"], n_heads=shape["num_attention_heads"])
    return _encoder(DistilBertModel(config), size, batch, config.vocab_size,
                    f"DistilBertModel ({config.n_layers} layers x {config.dim})")


def _t5_encoder(size: str, batch: int) -> Built:
    from transformers import T5Config, T5EncoderModel

    shape = _text(size)
    heads = shape["num_attention_heads"]
    config = T5Config(vocab_size=1000, num_layers=shape["num_hidden_layers"], d_model=shape["hidden_size"],
                      d_ff=shape["intermediate_size"], num_heads=heads, d_kv=shape["hidden_size"] // heads)
    return _encoder(T5EncoderModel(config), size, batch, config.vocab_size,
                    f"T5EncoderModel ({config.num_layers} layers x {config.d_model})")


def _roberta(size: str, batch: int) -> Built:
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=1000, **_text(size))
    return _encoder(RobertaModel(config, add_pooling_layer=False), size, batch, config.vocab_size,
                    f"RobertaModel ({config.num_hidden_layers} layers x {config.hidden_size})")


def _albert(size: str, batch: int) -> Built:
    from transformers import AlbertConfig, AlbertModel

    shape = _text(size)
    config = AlbertConfig(vocab_size=1000, embedding_size=shape["hidden_size"] // 2, **shape)
    return _encoder(AlbertModel(config, add_pooling_layer=False), size, batch, config.vocab_size,
                    f"AlbertModel ({config.num_hidden_layers} layers sharing weights x {config.hidden_size})")


def _llama_encoder(size: str, batch: int) -> Built:
    from transformers import LlamaConfig, LlamaModel

    shape = _text(size)
    config = LlamaConfig(vocab_size=1000, num_key_value_heads=shape["num_attention_heads"] // 2, use_cache=False,
                         **shape)
    return _encoder(LlamaModel(config), size, batch, config.vocab_size,
                    f"LlamaModel without cache ({config.num_hidden_layers} layers x {config.hidden_size}, "
                    f"{config.num_key_value_heads} key/value heads)")


def _side(size: str) -> int:
    return 224 if size == "full" else 64


def _convnext(size: str, batch: int) -> Built:
    from transformers import ConvNextConfig, ConvNextModel

    depths, widths = ([2, 2, 4, 2], [64, 128, 256, 512]) if size == "full" else ([1, 1, 1, 1], [8, 16, 32, 64])
    config = ConvNextConfig(depths=depths, hidden_sizes=widths)
    side = _side(size)
    return (LastHiddenState(ConvNextModel(config)), images(batch, side),
            f"ConvNextModel (depths {depths}, widths {widths}), {side}x{side}")


def _swin(size: str, batch: int) -> Built:
    from transformers import SwinConfig, SwinModel

    if size == "full":
        config = SwinConfig(embed_dim=64, depths=[2, 2, 4, 2], num_heads=[2, 4, 8, 16])
    else:
        config = SwinConfig(image_size=64, embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=4)
    side = config.image_size
    return (LastHiddenState(SwinModel(config)), images(batch, side),
            f"SwinModel (embed {config.embed_dim}, depths {config.depths}), {side}x{side}")


OUTSIDE_MODELS = {
    "distilbert": (_distilbert, "hidden"),
    "t5-encoder": (_t5_encoder, "hidden"),
    "roberta": (_roberta, "hidden"),
    "albert": (_albert, "hidden"),
    "llama-encoder": (_llama_encoder, "hidden"),
    "convnext": (_convnext, "hidden"),
    "swin": (_swin, "hidden"),
}
"""Name -> (builder, output kind), as the zoo's registry holds them."""
