"""The model registry: short names users type -> Hugging Face hub ids (torch-free data, no loading)."""

from __future__ import annotations

# "countdown" is embedded in the package and needs no download (hub id None); so is "countdown-net",
# a checkpoint shipped inside the package (see locate.EMBEDDED_DIR).
REGISTRY: dict[str, str | None] = {
    "countdown": None,
    "countdown-net": None,
    "countdown-dllm": None,  # a transformers masked diffusion LM in the LLaDA layout (lsdtool.models.dllm)
    "digits-net": None,  # a tauLDR image model of scikit-learn's 8x8 digits (config.yaml + EMA safetensors)
    "sedd-small": "louaaron/sedd-small",
    "sedd-medium": "louaaron/sedd-medium",
    "radd-lambda-dce": "JingyangOu/radd-lambda-dce",
    "radd-t-dce": "JingyangOu/radd-t-dce",
    "mdlm-owt": "kuleshov-group/mdlm-owt",
}


# Known models that no hub repository holds: name -> how to get them (then `--model DIR`).
DOWNLOAD_ONLY: dict[str, str] = {
    "tauldr-cifar10": "not on the Hugging Face hub: download the authors' CIFAR-10 folder (ckpt_*.pt + config yaml) "
                      "from the link in the readme of github.com/andrew-cr/tauLDR, then pass --model DIR",
}
