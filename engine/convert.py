"""Convert pretrained files into this engine's safetensors checkpoints, once, so later runs load them without any
pickle:

    python -m engine.convert vqgan --model_path last.ckpt --config_path model.yaml --out vqgan.safetensors
    python -m engine.convert openai --encoder encoder.pkl --decoder decoder.pkl --out dvae.safetensors
    python -m engine.convert dalle_pytorch --dalle_path dalle.pt --out dalle.safetensors

The VAEs then go to ``train.py --vae_path``; the DALL-E checkpoint to ``generate.py --dalle_path`` or ``train.py
--dalle_path``. The pickles are read with the restricted unpickler (``engine.io.unpickle``), which refuses anything but
tensors and plain data.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

from engine.io.checkpoint import CheckpointError, save_dalle, save_vae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", required=True)
    vqgan = kinds.add_parser("vqgan", help="a taming VQGAN (Lightning .ckpt + its yaml)")
    vqgan.add_argument("--model_path", required=True, help="taming checkpoint, e.g. last.ckpt")
    vqgan.add_argument("--config_path", required=True, help="its yaml, e.g. model.yaml")
    openai = kinds.add_parser("openai", help="OpenAI's dVAE (encoder.pkl + decoder.pkl)")
    openai.add_argument("--encoder", required=True, help="encoder.pkl")
    openai.add_argument("--decoder", required=True, help="decoder.pkl")
    openai.add_argument("--image_size", type=int, default=256, help="the pickles do not store it (DALL-E: 256)")
    dalle = kinds.add_parser("dalle_pytorch", help="a DALLE-pytorch dalle.pt (or its DeepSpeed -ds-cp folder)")
    dalle.add_argument("--dalle_path", required=True)
    dalle.add_argument("--vqgan_model_path", help="for a model trained on a VQGAN whose yaml the file lacks")
    dalle.add_argument("--vqgan_config_path")
    dalle.add_argument("--bpe_path", help="the tokenizer it was trained with (default: CLIP's BPE)")
    dalle.add_argument("--hug", action="store_true")
    dalle.add_argument("--chinese", action="store_true")
    for sub in (vqgan, openai, dalle):
        sub.add_argument("--out", required=True, help="the .safetensors file to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.kind == "vqgan":
            from engine.codecs.vqgan import VQGanVAE

            save_vae(args.out, VQGanVAE.from_taming(args.model_path, args.config_path),
                     extra={"converted_from": str(Path(args.model_path).resolve())})
        elif args.kind == "openai":
            from engine.codecs.openai_dvae import OpenAIDiscreteVAE

            save_vae(args.out, OpenAIDiscreteVAE.from_openai(args.encoder, args.decoder, image_size=args.image_size),
                     extra={"converted_from": str(Path(args.encoder).resolve().parent)})
        else:
            from engine.io.dalle_pytorch import load_dalle_pytorch

            ckpt = load_dalle_pytorch(args.dalle_path, vqgan_model_path=args.vqgan_model_path,
                                      vqgan_config_path=args.vqgan_config_path, bpe_path=args.bpe_path,
                                      hug=args.hug, chinese=args.chinese)
            save_dalle(args.out, ckpt.model, ckpt.tokenizer,
                       extra={**ckpt.extra, "converted_from": str(Path(args.dalle_path).resolve())})
    # What bad input files raise (the loaders turn most into CheckpointError, a ValueError; UnsafePickleError is an
    # UnpicklingError); the rest are programming errors and keep their traceback.
    except (OSError, ValueError, pickle.UnpicklingError, RuntimeError, KeyError, EOFError, zipfile.BadZipFile) as e:
        kind = "checkpoint" if isinstance(e, CheckpointError) else "file"
        raise SystemExit(f"error: cannot convert this {kind}: {e}") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
