"""Images for visual prompts: reading them safely, and the prompt layout shared by training and
inference.

An image is read with Pillow: its header is checked against a pixel limit before any decoding (a
small file can declare a huge image), then it is decoded fully (a truncated file fails here, not
later), flattened onto white if it has transparency, converted to RGB and resized to the model's
square input with bilinear filtering. The result is uint8 (3, S, S); the model normalises it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LMForgeError

MAX_PIXELS = 40_000_000
"""Largest image accepted (width x height), checked before decoding."""
IMAGE_MARK = "<image>"
"""Where an image goes in a prompt's text; each is replaced by the image's vectors."""
VISION_SYSTEM = "Answer questions about the image."
"""The system message of image chats that bring none (shorter than a chat model's default, which
every training example would otherwise carry)."""


def _open(data: bytes | Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except FileNotFoundError:
        raise LMForgeError(f"no such image file: {what}") from None
    except UnidentifiedImageError:
        raise LMForgeError(f"{what} is not an image Pillow can read (PNG, JPEG, GIF, BMP, WebP, ...)") from None
    except (OSError, ValueError) as e:
        raise LMForgeError(f"cannot read image {what}: {e}") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise LMForgeError(f"{what} is {w}x{h} pixels, over the limit of {MAX_PIXELS:,}; make it smaller")
    if w == 0 or h == 0:
        raise LMForgeError(f"{what} has no pixels")
    try:
        im.load()
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise LMForgeError(f"{what} is truncated or corrupt ({e})") from None
    return im


def load_image(source: str | Path | bytes, size: int, what: str | None = None) -> torch.Tensor:
    """An image file's path or its bytes -> uint8 (3, size, size)."""
    from PIL import Image

    if not isinstance(source, bytes):
        source = Path(source)
        if source.exists() and not source.is_file():
            raise LMForgeError(f"{source} is not a regular file")
    what = what or (str(source) if not isinstance(source, bytes) else "the image")
    im = _open(source, what)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # (3, S, S)


_DATA_URI = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,(.*)", re.S)


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a base64 `data:` URI. Remote URLs are refused: nothing is ever fetched."""
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        raise LMForgeError("image URLs are not fetched (no network); send the image inline as a data: URI "
                           "(data:image/png;base64,...)")
    m = _DATA_URI.fullmatch(uri.strip())
    if not m:
        raise LMForgeError("an image must be a base64 data: URI (data:image/png;base64,...)")
    try:
        return base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise LMForgeError("the image's data: URI is not valid base64") from None


def ids_with_images(tok, text: str, bos: bool) -> list[int]:
    """Token ids of a prompt whose text marks each image with IMAGE_MARK; each mark becomes the
    placeholder id models.vision.IMAGE (one image's vectors go there)."""
    from lmforge.models.vision import IMAGE

    ids = [tok.bos_id] if bos and tok.add_bos and tok.bos_id is not None else []
    for k, piece in enumerate(text.split(IMAGE_MARK)):
        if k:
            ids.append(IMAGE)
        if piece:
            ids.extend(tok.encode(piece, check=False))
    return ids


def question_ids(tok, question: str, chat: bool, n_images: int = 1) -> list[int]:
    """The prompt for a question about images, images first: a user turn of the model's chat
    template (chat), or "Question: ... Answer:" for a base model. Training and inference both
    build prompts here, so they cannot drift apart."""
    marks = IMAGE_MARK * n_images
    if chat:
        return chat_ids_with_images(tok, [{"role": "user", "content": question}], n_images)
    return ids_with_images(tok, f"{marks}\nQuestion: {question}\nAnswer:", bos=True)


def chat_ids_with_images(tok, messages: list[dict], n_images: int) -> list[int]:
    """A conversation about images as prompt ids (ready for the reply): the images go where the
    messages say IMAGE_MARK, or else before the first user message's text; VISION_SYSTEM is the
    system message when there is none."""
    msgs = [dict(m) for m in messages]
    if not any(IMAGE_MARK in str(m.get("content", "")) for m in msgs):
        first = next((i for i, m in enumerate(msgs) if m.get("role") == "user"), None)
        if first is None:
            raise LMForgeError("images need a user message to go with")
        msgs[first]["content"] = IMAGE_MARK * n_images + "\n" + str(msgs[first]["content"])
    if not msgs or msgs[0].get("role") != "system":
        msgs.insert(0, {"role": "system", "content": VISION_SYSTEM})
    return ids_with_images(tok, tok.render_chat(msgs, add_generation_prompt=True), bos=False)


def answer_ids(tok, answer: str, chat: bool) -> list[int]:
    """The reply a question's prompt is trained to produce: the answer, then the end of the turn."""
    end = [tok.eot_id] if tok.eot_id is not None else tok.encode("\n", check=False)
    return tok.encode(answer if chat else " " + answer, check=False) + end
