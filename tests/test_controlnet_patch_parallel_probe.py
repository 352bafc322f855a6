"""Step 2 of issue #15, probed: ComfyUI's ControlNet network made patch-parallel like the UNet.

Two gloo processes each build the same tiny ``comfy.cldm.cldm.ControlNet`` and ``UNetModel`` (the SD1.5
test config), wrap both with ``make_patch_parallel`` and the UNet family's attention adapter on ONE
band context (the ControlNet's layer ids after the UNet's: ``first_id``), and evaluate their band in
exact mode as a worker would: the ControlNet on the band's latent rows of ``x`` and the band's pixel
rows of the hint (8 x the latent rows, no halo cut in advance: the hint block's 3x3 convs exchange
their halos like any other conv), then the UNet on the same rows with those residuals. Each band's
residuals must equal the whole ControlNet's rows (``control_bands.level_rows``) and its UNet output
the whole UNet's rows. The layers under docs/CONTROLNET.md's step 2 (stadi_core/runtime/worker_controls.py
does this in the workers), checked here apart from the rest of the pack.
"""

from __future__ import annotations

import copy
import socket
import sys
from datetime import timedelta


from comfy_support import TINY_SD15_UNET_CONFIG, comfyui_marks, random_fill, require_comfyui

pytestmark = comfyui_marks()

ROWS = [8, 16]  # uneven bands of a 24-row latent (the SD1.5 alignment is 8)
WIDTH = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, comfy_dir: str, queue) -> None:
    import torch
    import torch.distributed as dist

    try:
        sys.path.insert(0, comfy_dir)
        import comfy.options  # noqa: F401
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.cldm.cldm
        import comfy.ops

        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        from stadi_core.models import comfy_unet
        from stadi_core.models.control_bands import level_rows
        from stadi_core.parallel import BandContext, Phase, make_patch_parallel

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(ROWS),
                                timeout=timedelta(seconds=120))
        ops = comfy.ops.disable_weight_init

        def seeded(make, seed):
            sd: dict = {}
            random_fill(sd, make("meta"), "", torch.Generator().manual_seed(seed))
            module = make(None)
            module.load_state_dict({k: v.float() for k, v in sd.items()})
            return module

        config = {k: v for k, v in TINY_SD15_UNET_CONFIG.items() if k != "out_channels"}
        net = seeded(lambda d: comfy.cldm.cldm.ControlNet(**config, hint_channels=3, dtype=torch.float32, device=d,
                                                          operations=ops), 1)
        unet = seeded(lambda d: UNetModel(**TINY_SD15_UNET_CONFIG, dtype=torch.float32, device=d, operations=ops), 3)
        gen = torch.Generator().manual_seed(2)
        height = sum(ROWS)
        x = torch.randn(2, 4, height, WIDTH, generator=gen)
        hint = torch.rand(2, 3, 8 * height, 8 * WIDTH, generator=gen)
        t = torch.tensor([500.0, 500.0])
        context = torch.randn(2, 77, 768, generator=gen)
        def fresh(control):  # the UNet pops the lists
            return {k: list(v) for k, v in control.items()}

        with torch.inference_mode():
            full = net(x=x, hint=hint, timesteps=t, context=context)
            full_out = unet(x, t, context=context, control=fresh(full))
            band_unet, band_net = copy.deepcopy(unet), copy.deepcopy(net)
            ctx = BandContext(ROWS, rank, dist.group.WORLD, timeout_s=120)
            unet_counts = make_patch_parallel(band_unet, ctx, comfy_unet.patch_attention)
            counts = make_patch_parallel(band_net, ctx, comfy_unet.patch_attention, first_id=unet_counts["ids"])
            start = sum(ROWS[:rank])
            end = start + ROWS[rank]
            ctx.begin_call(Phase.FRESH, 0, WIDTH)
            band = band_net(x=x[:, :, start:end], hint=hint[:, :, 8 * start:8 * end], timesteps=t, context=context)
            band_out = band_unet(x[:, :, start:end], t, context=context, control=fresh(band))
            ctx.end_call()
            # a displaced call on the same inputs reads the other band's stored context of the call before,
            # which is the same: it must give the same output, unless two layers share a context key
            ctx.begin_call(Phase.REFRESH, 0, WIDTH)
            again = band_net(x=x[:, :, start:end], hint=hint[:, :, 8 * start:8 * end], timesteps=t, context=context)
            again_out = band_unet(x[:, :, start:end], t, context=context, control=fresh(again))
            ctx.end_call()
            ctx.complete_inflight()
        worst = 0.0
        for key, items in full.items():
            for f, b in zip(items, band[key]):
                rows = level_rows(height, f.shape[2], start, end)
                want = f[:, :, rows]
                assert b.shape == want.shape, (key, b.shape, want.shape)
                worst = max(worst, ((b - want).abs().max() / want.abs().max()).item())
        want = full_out[:, :, start:end]
        unet_worst = ((band_out - want).abs().max() / want.abs().max()).item()
        displaced = ((again_out - band_out).abs().max() / want.abs().max()).item()
        queue.put((rank, (worst, unet_worst, displaced), counts, None))
    except BaseException as exc:  # report instead of hanging the parent
        import traceback

        queue.put((rank, None, None, traceback.format_exc() + repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_patch_parallel_controlnet_beside_its_unet_gives_each_band_its_rows():
    import torch.multiprocessing as mp

    comfy = require_comfyui()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(comfy), queue)) for r in range(len(ROWS))]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [e for _, _, _, e in results if e]
    assert not errors, errors[0]
    for rank, (worst, unet_worst, displaced), counts, _ in sorted(results, key=lambda r: r[0]):
        print(f"rank {rank} (rows {ROWS[rank]}): ControlNet layers made patch-parallel {counts}; worst residual "
              f"relative |band - whole ControlNet rows| {worst:.2g}; UNet output with them |band - whole| "
              f"{unet_worst:.2g}; displaced call on the same inputs |again - fresh| {displaced:.2g}")
        assert counts["conv"] > 0 and counts["groupnorm"] > 0 and counts["attention"] > 0
        assert worst < 1e-5 and unet_worst < 1e-5 and displaced < 1e-5, (worst, unet_worst, displaced)
