"""Optional appearance writer backed by an OpenAI-compatible ``/v1/chat/completions`` endpoint (paper §4,
stage two). Off by default; standard library HTTP only. Its output must pass the same JSON schema as the
offline writer; on any failure the pipeline keeps the offline description and flags the record.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ...errors import ConfigError
from ...organs import get_organ
from .prompts import OrganPrompts
from .schema import DESCRIPTION_SCHEMA, description_errors

ABDOMEN_WINDOW = (40.0, 400.0)  # level, width in HU

PROMPT_TEMPLATE = """You describe the appearance of one organ on an axial abdominal CT slice.
Target organ: {organ_name} (key "{organ_key}").
Visual prompts (pixels, x = column, y = row, image size {width}x{height}, origin top-left):
- bounding boxes [x_min, y_min, x_max, y_max]: {boxes}
- center point [x, y]: {center}
Pixel spacing: {row_mm:.3f} mm between rows, {col_mm:.3f} mm between columns.
The image is displayed in radiological convention: the patient's right is on the image's left.
Describe shape, size (area in cm^2), position (patient side and anterior/posterior), intensity (mean HU and
density relative to the liver, or to soft tissue when the liver is not visible), boundary clarity, texture and
adjacent organs (keys from: {organ_keys}).
Answer with ONE JSON object and nothing else, valid against this JSON schema:
{schema}"""


@dataclass
class LLMWriterConfig:
    url: str
    model: str
    api_key_env: Optional[str] = None   # name of the environment variable holding the key (never the key)
    timeout_s: float = 60.0
    temperature: float = 0.0

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"LLM writer URL '{self.url}' is not an http(s) URL",
                              "give e.g. --llm-url http://localhost:8000/v1")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ConfigError(f"environment variable {self.api_key_env} (the LLM API key) is not set",
                              f"export {self.api_key_env}=... or drop --llm-key-env for servers without a key")

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def windowed_png_base64(image_hu: np.ndarray, level: float = ABDOMEN_WINDOW[0], width: float = ABDOMEN_WINDOW[1]) -> str:
    """(H, W) HU -> base64 PNG (8-bit grey, abdomen window)."""
    from PIL import Image

    low = level - width / 2
    grey = np.clip((image_hu.astype(np.float32) - low) / width * 255.0, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def extract_json_object(text: str) -> Dict[str, Any]:
    """The JSON object in a model reply, tolerating ```json fences and surrounding prose."""
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, flags=re.DOTALL)
    candidate = fenced.group(1) if fenced else text[text.find("{"): text.rfind("}") + 1]
    value = json.loads(candidate)
    if not isinstance(value, dict):
        raise ValueError("the reply is not a JSON object")
    return value


class LLMDescriptionWriter:
    """Picklable (holds only its config), so pool workers can use it."""

    def __init__(self, config: LLMWriterConfig):
        self.config = config

    @property
    def name(self) -> str:
        return f"llm:{self.config.model}"

    def build_request(self, image_hu: np.ndarray, organ_key: str, prompts: OrganPrompts,
                      spacing_rc: Sequence[float]) -> Dict[str, Any]:
        from .schema import ORGAN_KEYS

        organ = get_organ(organ_key)
        text = PROMPT_TEMPLATE.format(
            organ_name=organ.name, organ_key=organ.key, width=image_hu.shape[1], height=image_hu.shape[0],
            boxes=json.dumps(prompts.boxes), center=json.dumps(list(prompts.center)),
            row_mm=spacing_rc[0], col_mm=spacing_rc[1], organ_keys=", ".join(ORGAN_KEYS),
            schema=json.dumps(DESCRIPTION_SCHEMA))
        return {
            "model": self.config.model, "temperature": self.config.temperature,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{windowed_png_base64(image_hu)}"}},
            ]}],
        }

    def _post(self, payload: Dict[str, Any]) -> Dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.config.api_key_env, '')}"
        request = urllib.request.Request(self.config.endpoint, data=json.dumps(payload).encode("utf-8"),
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def describe(self, image_hu: np.ndarray, organ_key: str, prompts: OrganPrompts,
                 spacing_rc: Sequence[float]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
        """(description, None) on success, (None, problem) otherwise. Never raises for endpoint trouble."""
        try:
            reply = self._post(self.build_request(image_hu, organ_key, prompts, spacing_rc))
            content = reply["choices"][0]["message"]["content"]
            description = extract_json_object(content)
        except urllib.error.HTTPError as exc:
            return None, f"HTTP {exc.code} from {self.config.endpoint}"
        except (urllib.error.URLError, OSError) as exc:
            return None, f"cannot reach {self.config.endpoint}: {getattr(exc, 'reason', exc)}"
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            return None, f"unusable reply: {exc}"
        description.setdefault("source", "llm")
        errors = description_errors(description)
        if errors:
            return None, f"reply fails the description schema: {errors[0]}"
        return description, None
