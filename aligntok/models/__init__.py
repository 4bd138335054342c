"""Tokenizer models: foundation encoder, adapter, decoder, discriminator, VAE baseline (the DiT lives in dit.py)."""
from aligntok.models.adapter import Adapter
from aligntok.models.decoder import Decoder
from aligntok.models.discriminator import PatchDiscriminator
from aligntok.models.encoder import EncoderLoadError, FoundationEncoder, build_encoder
from aligntok.models.tokenizer import TOKENIZER_SIZES, AlignTokenizer, Tokenizer, TokenizerLoadError
from aligntok.models.vae import ConvEncoder

__all__ = ["Adapter", "AlignTokenizer", "ConvEncoder", "Decoder", "EncoderLoadError", "FoundationEncoder",
           "PatchDiscriminator", "TOKENIZER_SIZES", "Tokenizer", "TokenizerLoadError", "build_encoder"]
