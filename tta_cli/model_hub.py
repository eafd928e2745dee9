"""Whether a model's pretrained weights can be had before timm tries: in the Hugging Face cache, or
the hub (or the proxy) answering within a second. Without this an offline ``--model vit_base`` waits
over a minute for huggingface_hub's retries to give up."""

from __future__ import annotations

from tta_cli.errors import TTAError


def offline_hint(name: str) -> str:
    return (
        f"the weights of {name} are not in the Hugging Face cache and cannot be downloaded: download them "
        "where there is network (e.g. `hf download timm/<model>`) and set HF_HOME/HF_HUB_CACHE, or use "
        "--model local-dir:FOLDER, --checkpoint FILE, or --no-pretrained"
    )


HUB_PROBE_SECONDS = 1.0
"""How long the check that the Hugging Face hub can be reached waits, where the weights are not
cached (huggingface_hub's own retries take over a minute to give up without a network)."""
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _hub_repo(name: str) -> tuple[str, tuple[str, ...]] | None:
    """The hub repository timm would download ``name``'s weights from, and the files it tries;
    None where they come from elsewhere (a local folder, a URL)."""
    if name.startswith("hf-hub:"):
        return name.removeprefix("hf-hub:").split("@")[0], HUB_WEIGHT_FILES
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    extra = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else ()
    return cfg.hf_hub_id, (*extra, *HUB_WEIGHT_FILES)


def _cached(repo: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def _hub_address() -> tuple[str, int]:
    """Host and port a download connects to first: the HTTPS proxy where one is set, else the hub."""
    import os
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(variable):
            proxy = urlsplit(os.environ[variable] if "://" in os.environ[variable] else f"http://{os.environ[variable]}")
            return proxy.hostname or "", proxy.port or 80
    endpoint = urlsplit(constants.ENDPOINT)
    return endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)


def reachable(host: str, port: int, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (name lookup
    included: it runs in a thread that is given up on at the deadline)."""
    import socket
    import threading

    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.2)
    return bool(result and result[0])


def check_weights_available(name: str) -> None:
    """Fail at once, with the hint, where the weights are neither in the Hugging Face cache nor
    downloadable: ``HF_HUB_OFFLINE`` is set or the hub (or the proxy) does not answer."""
    hub = _hub_repo(name)
    if hub is None or _cached(*hub):
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise TTAError(f"cannot load weights for {name}: not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                       offline_hint(name))
    host, port = _hub_address()
    if not reachable(host, port):
        raise TTAError(f"cannot load weights for {name}: not in the Hugging Face cache and {host} cannot be "
                       "reached (no network?)", offline_hint(name))
