"""Load a GPTQ checkpoint with gptqmodel 7.7 and write its logits on given tokens (run with gptqmodel's venv).

/path/to/gptqmodel-venv/bin/python benchmarks/peers/gptqmodel_logits.py CKPT TOKENS.safetensors OUT.safetensors
"""

import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    ckpt, tokens, out = sys.argv[1:4]
    torch.set_num_threads(1)
    from gptqmodel import GPTQModel

    model = GPTQModel.load(ckpt, device="cpu")
    ids = load_file(tokens)["input_ids"]
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits.float()
    save_file({"logits": logits.contiguous()}, out)
    print(type(model.model).__name__, "ok", next(model.model.parameters()).dtype)


if __name__ == "__main__":
    main()
