"""LoRA files -> weight changes, in numpy: kohya / AUTOMATIC1111, diffusers (PEFT) and older diffusers layouts.

A LoRA stores, for some linear or convolution layers, a low-rank pair: `down` (rank x in [x kh x kw]) and
`up` (out x rank [x 1 x 1]), and optionally `alpha`. At multiplier m the layer's weight becomes

    W + m * (alpha / rank) * up @ down            (alpha missing: alpha = rank)

which is what diffusers computes at run time (`load_lora_weights`, y = Wx + m * s * up(down(x))) and when fusing.
Convolution LoRAs (LoCon: 3x3 `down`, 1x1 `up`) reshape to the same product. Key layouts understood:

- kohya / AUTOMATIC1111: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_` (`lora_te1_`, `lora_te2_`) for the text encoder(s). The module path is
  the diffusers one with dots turned into underscores; it is resolved against the model's own module names.
  kohya's SDXL files name UNet layers in Stability's layout (`lora_unet_input_blocks_4_1_...`, see `sgm_names`).
- diffusers / PEFT: `unet.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), `text_encoder.<module>...`,
  alphas from `<module>.alpha` keys or the `lora_adapter_metadata` diffusers writes in the header.
- older diffusers: `<module>.lora.down.weight` / `.lora.up.weight`, `<attn>.processor.to_q_lora.down.weight`,
  `<module>.lora_linear_layer.down.weight`.

LyCORIS' other networks (LoHa, LoKr, Tucker `lora_mid`, DoRA) are refused by name, as diffusers does.
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leansd.runtime.adapters.sgm_names import SgmNames
from leansd.runtime.adapters.tensor_file import TensorFile, file_sha256
from leansd.runtime.errors import InvalidInputError, LeanSDWarning

# kohya prefixes -> the model component they change
_KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_DOTTED = ("unet.", "text_encoder.", "text_encoder_2.")
_UNSUPPORTED = (("hada_", "LoHa"), ("lokr_", "LoKr"), ("lora_mid", "LoCon with a Tucker middle factor"), ("dora_scale", "DoRA"),
                ("lora_magnitude_vector", "DoRA"), ("diff", "full weight differences"), ("diff_b", "full bias differences"))
# older diffusers attention processors: `processor.to_q_lora` is the layer `to_q` (`to_out_lora`: `to_out.0`)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


@dataclass(frozen=True)
class LowRank:
    """One layer's pair; `scale` is alpha / rank."""

    up: np.ndarray
    down: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def add_to(self, weight: np.ndarray, multiplier: float, transposed: bool = False) -> None:
        """weight += multiplier * scale * up @ down, in place; `transposed`: `weight` is stored transposed (in x out),
        as exported linear layers are, and the product is formed in that layout (no transposed copy)."""
        up = self.up.reshape(self.up.shape[0], self.rank) * np.float32(multiplier * self.scale)
        down = self.down.reshape(self.rank, -1)
        product = down.T @ up.T if transposed else up @ down
        weight += product.reshape(weight.shape)

@dataclass
class LoraFile:
    """A parsed LoRA file: layer pairs by component and (unresolved) module name."""

    path: Path
    hash: str  # AUTOMATIC1111's short hash (`Lora hashes` in its infotext)
    sha256: str
    layers: dict[tuple[str, str], LowRank] = field(default_factory=dict)  # (component, module key) -> pair
    kohya: bool = False

    @property
    def name(self) -> str:
        return self.path.stem

    def resolve(self, known: Mapping[str, Iterable[str]]) -> dict[str, dict[str, LowRank]]:
        """The pairs by component and diffusers weight name (`<module>.weight`), given each component's weight
        names. Layers the model does not have are reported in one warning; none at all is an error."""
        lookup = {c: _lookup(params, c, self.kohya) for c, params in known.items()}
        out: dict[str, dict[str, LowRank]] = {}
        missing = []
        for (component, module), pair in self.layers.items():
            param = lookup.get(component, {}).get(module)
            if param is None:
                missing.append(f"{component}:{module}")
                continue
            out.setdefault(component, {})[param] = pair
        if not out:
            raise InvalidInputError(f"LoRA {self.path.name}: none of its {len(self.layers)} layers is in this model (e.g. {missing[0]}); "
                                    "it was made for another model architecture (SD 1.x, SD 2.x, SDXL...)")
        if missing:
            warnings.warn(f"LoRA {self.path.name}: {len(missing)} of its {len(self.layers)} layers are not in this model and were "
                          f"skipped (e.g. {missing[0]})", LeanSDWarning, stacklevel=3)
        return out


def _unsupported(name: str) -> str | None:
    """What kind of network a tensor name belongs to, when it is not one leansd applies."""
    parts = name.split(".")
    for marker, what in _UNSUPPORTED:
        if any(p == marker or marker.endswith("_") and p.startswith(marker) for p in parts):
            return what
    if name.endswith(("lora_B.bias", "lora_up.bias", "lora.up.bias")):
        return "LoRA biases"
    return None


def _module_key(module: str, kohya: bool) -> str:
    return module.replace(".", "_") if kohya else module


def _lookup(params: Iterable[str], component: str, kohya: bool) -> dict[str, str]:
    """A file's module key -> the model's weight name; kohya UNet keys also in Stability's layout (its SDXL files)."""
    modules = {p[: -len(".weight")]: p for p in params if p.endswith(".weight")}
    out = {_module_key(m, kohya): p for m, p in modules.items()}
    if kohya and component == "unet":
        sgm = SgmNames(modules)
        for module, param in modules.items():
            name = sgm(module)
            if name is not None:
                out.setdefault(_module_key(name, kohya), param)
    return out


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA `.safetensors` file (pickled `.pt`/`.ckpt` LoRAs are refused: convert them to safetensors)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidInputError(f"LoRA {path.name} is not a .safetensors file; leansd reads LoRAs in safetensors only "
                                "(convert a .pt/.ckpt LoRA with a tool that has PyTorch, e.g. safetensors.torch.save_file)")
    tensors = TensorFile(path)
    names = tensors.names
    for name in names:
        what = _unsupported(name)
        if what:
            raise InvalidInputError(f"LoRA {path.name} holds {what} ({name}), which leansd does not apply; use a plain LoRA/LoCon file")
    kohya = bool(names) and all(n.startswith(tuple(_KOHYA)) for n in names)
    hash_ = tensors.metadata.get("sshs_model_hash") or tensors.body_sha256()
    lora = LoraFile(path, hash_[:12], file_sha256(path), kohya=kohya)
    metadata = _peft_alphas(tensors.metadata)
    _check_metadata(metadata, path)
    groups = _group_kohya(names) if kohya else _group_dotted(names, metadata)
    for (component, module), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise InvalidInputError(f"LoRA {path.name}: layer {module} has {'no up' if 'down' in parts else 'no down'} matrix; the file is incomplete")
        down, up = tensors.tensor(parts["down"]), tensors.tensor(parts["up"])
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or up.ndim == 4 and up.shape[2:] != (1, 1):
            raise InvalidInputError(f"LoRA {path.name}: layer {module} has down {down.shape} and up {up.shape}, which do not "
                                    "form a low-rank pair; the file is damaged or of another kind")
        alpha = parts.get("alpha")
        if isinstance(alpha, str):
            alpha = float(tensors.tensor(alpha).reshape(-1)[0])
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        lora.layers[(component, module)] = LowRank(up, down, scale)
    if not lora.layers:
        raise InvalidInputError(f"LoRA {path.name} has no LoRA layers (its tensors are named like {names[:1]}); pass a LoRA file")
    return lora


def _group_kohya(names: list[str]) -> dict[tuple[str, str], dict]:
    groups: dict[tuple[str, str], dict] = {}
    for name in names:
        base, _, suffix = name.partition(".")
        prefix = next(p for p in sorted(_KOHYA, key=len, reverse=True) if base.startswith(p))
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
        if role is None:
            raise InvalidInputError(f"LoRA tensor {name!r} is of a kind leansd does not know (expected lora_down/lora_up/alpha)")
        groups.setdefault((_KOHYA[prefix], base[len(prefix):]), {})[role] = name
    return groups


_DOTTED_ROLES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_A.default.weight", "down"),
                 (".lora_B.default.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                 (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
                 (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha"))


def _group_dotted(names: list[str], alphas: Mapping[str, float]) -> dict[tuple[str, str], dict]:
    prefixed = any(n.startswith(_DOTTED) for n in names)
    groups: dict[tuple[str, str], dict] = {}
    for name in names:
        component, rest = "unet", name  # files without prefixes hold UNet layers (as diffusers reads them)
        if prefixed:
            component = next((p[:-1] for p in sorted(_DOTTED, key=len, reverse=True) if name.startswith(p)), "")
            if not component:
                raise InvalidInputError(f"LoRA tensor {name!r} names no known model part (unet., text_encoder.)")
            rest = name[len(component) + 1:]
        role = next(((r, suffix) for suffix, r in _DOTTED_ROLES if rest.endswith(suffix)), None)
        if role is None:
            raise InvalidInputError(f"LoRA tensor {name!r} is of a kind leansd does not know (expected lora_A/lora_B or lora.down/lora.up)")
        module = rest[: -len(role[1])]
        processor = _PROCESSOR.search(module)
        if processor:
            layer = processor.group(1)
            module = module[: processor.start()] + "." + ("to_out.0" if layer == "to_out" else layer)
        groups.setdefault((component, module), {})[role[0]] = name
    for (component, module), parts in groups.items():
        if "alpha" not in parts:
            alpha = _pattern_alpha(alphas, component, module)
            if alpha is not None:
                parts["alpha"] = alpha
    return groups


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    """`<component>.lora_alpha` and `<component>.alpha_pattern` from diffusers' `lora_adapter_metadata`, with the
    rank they go with (`<component>.r`, `.rank_pattern`) left to the file's shapes."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _pattern_alpha(meta: Mapping, component: str, module: str) -> float | None:
    pattern = meta.get(f"{component}.alpha_pattern") or {}
    for key, value in (pattern.items() if isinstance(pattern, dict) else ()):
        if module == key or module.endswith("." + key):
            return float(value)
    value = meta.get(f"{component}.lora_alpha")
    return None if value is None else float(value)


def _check_metadata(meta: Mapping, path: Path) -> None:
    """Refuse adapter settings that change the arithmetic in ways this module does not reproduce."""
    for key, value in meta.items():
        if key.rsplit(".", 1)[-1] in ("use_rslora", "use_dora", "lora_bias") and value:
            raise InvalidInputError(f"LoRA {path.name} was trained with {key.rsplit('.', 1)[-1]}, which leansd does not apply; "
                                    "fuse it at export instead (sd-export --lora)")
