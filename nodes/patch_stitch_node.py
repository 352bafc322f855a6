"""Patch Stitch node: a STADI run's bands as one LATENT, a picture of the plan, and (with a VAE)
the image decoded band by band and stitched in pixel space.

Band-wise decoding: each band is decoded with `overlap_rows` extra latent rows of its
neighbours taken from the stitched latent (so the VAE decoder sees real context across the
seam); the two decodes of each seam are cross-faded linearly over the middle of the region both
cover (overlap_rows latent rows wide, centred on the seam), and the outer half of each
extension, decoded without context of its own, is dropped. With overlap 0 this is plain concatenation of separately decoded bands.

decode_on="devices": each worker of the run decodes its own band (the same slices, in parallel;
device_decode.py) and the server stitches the pixel bands the same way.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from .plan_picture import plan_image, text_image
from .types import PATCHES_TYPE, StadiPatches

log = logging.getLogger("stadi")

__all__ = ["PatchStitch", "stitch_decoded", "decode_bands", "stitch_band_images", "band_extensions"]

NO_VAE_TEXT = "connect a VAE to decode the bands"
DECODE_ON = ["server", "devices"]


def band_extensions(rows: Sequence[int], overlap: int) -> list[tuple[int, int]]:
    """(extra rows above, extra rows below) of each band: `overlap`, clipped at the latent's edges."""
    total = sum(rows)
    out, start = [], 0
    for r in rows:
        out.append((min(overlap, start), min(overlap, total - start - r)))
        start += r
    return out


def _infer_scale(heights: Sequence[int], rows: Sequence[int], overlap_px: int) -> int:
    """Pixel rows per latent row that explains every decoded band's height."""
    upper = max(1, heights[0] // max(1, rows[0]))
    for s in range(1, upper + 1):
        ext = band_extensions([r * s for r in rows], overlap_px)
        if all(h == r * s + a + b for h, r, (a, b) in zip(heights, rows, ext)):
            return s
    raise ValueError(f"decoded band heights {list(heights)} do not match bands of {list(rows)} latent rows "
                     f"with {overlap_px} pixel rows of overlap")


def stitch_decoded(decoded_bands: Sequence[torch.Tensor], rows: Sequence[int], overlap_px: int,
                   scale: int | None = None) -> torch.Tensor:
    """Stitch separately decoded bands (B, h_i, W, C) into one image (B, scale*sum(rows), W, C).

    Band i was decoded from its `rows[i]` latent rows plus `overlap_px / scale` rows of its
    neighbours above and below (clipped at the image's edges), so its height is
    scale*rows[i] + top_i + bottom_i pixels. Around each seam the two decodes are cross-faded
    linearly over [seam - o, seam + o) with o = overlap_px // 2 (limited so that a band's two
    seams never overlap): the middle half of the region both decodes cover, so the outer
    overlap_px // 2 rows of every decode, the ones that lacked context, are never used. Where
    both decodes agree the result is exactly that value (lerp of equals).
    """
    rows = [int(r) for r in rows]
    if len(decoded_bands) != len(rows) or not rows:
        raise ValueError(f"{len(decoded_bands)} decoded bands for {len(rows)} row counts")
    if any(r < 1 for r in rows):
        raise ValueError(f"every band needs at least one row, got {rows}")
    overlap_px = max(0, int(overlap_px))
    heights = [int(d.shape[1]) for d in decoded_bands]
    s = int(scale) if scale else _infer_scale(heights, rows, overlap_px)
    px_rows = [r * s for r in rows]
    ext = band_extensions(px_rows, overlap_px)
    for i, (h, pr, (a, b)) in enumerate(zip(heights, px_rows, ext)):
        if h != pr + a + b:
            raise ValueError(f"band {i}: decoded height {h}, expected {pr} + {a} above + {b} below")
    first = decoded_bands[0]
    if any(d.shape[0] != first.shape[0] or d.shape[2:] != first.shape[2:] for d in decoded_bands):
        raise ValueError("decoded bands differ in batch size, width or channels: "
                         + ", ".join(str(tuple(d.shape)) for d in decoded_bands))

    # own rows of every band
    out = torch.cat([d[:, a:a + pr] for d, pr, (a, _) in zip(decoded_bands, px_rows, ext)], dim=1)

    # cross-fade each seam
    P = len(rows)
    seam = 0
    for i in range(P - 1):
        seam += px_rows[i]
        lim_up = px_rows[i] if i == 0 else px_rows[i] // 2
        lim_dn = px_rows[i + 1] if i + 1 == P - 1 else px_rows[i + 1] // 2
        o = min(overlap_px // 2, lim_up, lim_dn)
        if o <= 0:
            continue
        up, dn = decoded_bands[i], decoded_bands[i + 1]
        a_up, a_dn = ext[i][0], ext[i + 1][0]
        # rows [seam - o, seam + o) in each decode's own coordinates
        seg_up = up[:, a_up + px_rows[i] - o: a_up + px_rows[i] + o]
        seg_dn = dn[:, a_dn - o: a_dn + o]
        w = (torch.arange(2 * o, dtype=torch.float64) + 0.5) / (2 * o)
        w = w.to(dtype=seg_up.dtype if seg_up.is_floating_point() else torch.float32, device=seg_up.device)
        w = w.view(1, 2 * o, *([1] * (seg_up.dim() - 2)))
        out[:, seam - o: seam + o] = torch.lerp(seg_up, seg_dn.to(seg_up.dtype), w.expand_as(seg_up))
    return out


def decode_bands(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, rows: Sequence[int],
                 overlap_rows: int) -> torch.Tensor:
    """Decode a (B, C, H, W) latent band by band (each with `overlap_rows` rows of its neighbours'
    context) and stitch the pixels. `decode` maps (B, C, h, W) -> (B, h*s, W*s, 3), as ComfyUI's
    VAE.decode does."""
    rows = [int(r) for r in rows]
    if sum(rows) != latent.shape[2]:
        raise ValueError(f"bands of {rows} rows do not tile a latent of {latent.shape[2]} rows")
    overlap_rows = max(0, int(overlap_rows))
    decoded, start = [], 0
    for r, (a, b) in zip(rows, band_extensions(rows, overlap_rows)):
        decoded.append(decode(latent[:, :, start - a: start + r + b]))
        start += r
    return stitch_band_images(decoded, rows, overlap_rows)


def stitch_band_images(images: Sequence[torch.Tensor], rows: Sequence[int], overlap_rows: int) -> torch.Tensor:
    """Stitch what the VAE made of each band (decoded with `overlap_rows` latent rows of context, as
    `band_extensions` gives them), wherever it was decoded: the server (decode_bands) or the workers."""
    rows = [int(r) for r in rows]
    overlap_rows = max(0, int(overlap_rows))
    decoded, scale = [], None
    for img, r, (a, b) in zip(images, rows, band_extensions(rows, overlap_rows)):
        if img.dim() == 5:  # video VAEs: (B, T, H, W, C) -> frames as batch, as VAEDecode does
            img = img.reshape(-1, *img.shape[-3:])
        h = a + r + b
        if img.shape[1] % h:
            raise ValueError(f"the VAE decoded {h} latent rows into {img.shape[1]} pixel rows, not a whole multiple")
        s = img.shape[1] // h
        if scale is not None and s != scale:
            raise ValueError(f"the VAE's scale changed between bands ({scale} then {s})")
        scale = s
        decoded.append(img)
    return stitch_decoded(decoded, rows, overlap_rows * scale, scale=scale)


class PatchStitch:
    """ComfyUI node: STADI_PATCHES -> LATENT, plan picture, band-wise decoded image."""

    DESCRIPTION = ("Stitches a STADI Sampler's bands into one latent, draws the plan (which device computed which "
                   "rows, its stride and its time), and with a VAE decodes the bands separately with "
                   "'overlap_rows' rows of context and cross-fades the seams.")
    CATEGORY = "sampling/STADI"
    FUNCTION = "stitch"
    RETURN_TYPES = ("LATENT", "IMAGE", "IMAGE")
    RETURN_NAMES = ("latent", "plan", "image")
    OUTPUT_TOOLTIPS = ("The stitched latent (same as the STADI Sampler's LATENT output).",
                       "A picture of the plan and each device's time.",
                       "The bands decoded separately and stitched (a placeholder when no VAE is connected).")
    OUTPUT_NODE = False

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "patches": (PATCHES_TYPE, {"tooltip": "The STADI Sampler's patches output."}),
                "overlap_rows": ("INT", {"default": 4, "min": 0, "max": 64, "step": 1, "tooltip":
                                 "Latent rows of neighbour context each band is decoded with; the seams are "
                                 "cross-faded over them. 0 = plain concatenation."}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "Decode the bands with this VAE (else the image output is a placeholder)."}),
                # optional, so prompts and workflows saved before it existed still validate
                "decode_on": (DECODE_ON, {"default": "server", "tooltip":
                              "server: ComfyUI decodes the bands one after another. devices: every worker of the "
                              "STADI run decodes its own band in parallel (the VAE's weights are sent to them once; "
                              "each device then holds a VAE next to the diffusion model). Falls back to the server, "
                              "with a note on the plan picture, when the run's workers are gone."}),
            },
        }

    def stitch(self, patches: StadiPatches, overlap_rows: int = 4, vae=None, decode_on: str = "server"):
        if not isinstance(patches, StadiPatches) or not patches.bands:
            raise ValueError("patches: expected the 'patches' output of a STADI Sampler")
        if decode_on not in DECODE_ON:
            raise ValueError(f"decode_on: {decode_on!r}, expected one of {DECODE_ON}")
        latent = patches.as_latent()
        notes: list[str] = []
        if vae is None:
            image = text_image(NO_VAE_TEXT, width=320, height=64)
        else:
            rows = [int(b.shape[2]) for b in patches.bands]
            image = None
            if decode_on == "devices":
                from .device_decode import try_device_decode

                image, job = try_device_decode(patches, vae, latent["samples"], rows, overlap_rows)
                notes.extend(job.notes)
                if image is None:
                    log.warning("STADI Patch Stitch: %s", "; ".join(job.notes))
                else:
                    log.info("STADI Patch Stitch: %s", "; ".join(job.notes))
            if image is None:
                image = decode_bands(vae.decode, latent["samples"], rows, overlap_rows)
        report = dict(patches.report, notes=list(patches.report.get("notes") or []) + notes) if notes else patches.report
        picture = plan_image(patches.plan, report)
        return (latent, picture, image)
