"""Inversion: the sampler run backwards from x_0, as a triangular system solved in parallel.

The tests state: DDIM inversion (``exact=False``) equals the sequential inverse loop and
diffusers' ``DDIMInverseScheduler`` stepped sequentially (float64, at tol -> 0) for every solver
and window; exact inversion makes the forward sampler reproduce x_0 to the tolerance and agrees
with the per-step fixed-point loop; layouts follow x0; samplers without an inverse are refused
with the reason; for Stable Diffusion, ``invert(pipe, image)`` gives latents that ``sample``
turns back into the encoded image.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fpsolve
from fpsolve.errors import InvalidOptionError, ShapeError, UnsupportedError
from fpsolve.inversion import InverseSampler, reconstruction_error
from fpsolve.models import GaussianMixtureDenoiser
from fpsolve.samplers import DDIM, DDPM, DPMSolver

from .conftest import ALPHAS_CUMPROD, spaced

DIM = 8
MODEL = GaussianMixtureDenoiser.random(dim=DIM, components=3, std=0.3, seed=1)


def ddim_system(steps: int, batch: int | None = 3, **options) -> fpsolve.TriangularSystem:
    sampler = DDIM(alphas_cumprod=MODEL.alphas_cumprod, timesteps=spaced(steps), **options)
    return fpsolve.TriangularSystem(sampler=sampler, denoiser=MODEL, shape=(DIM,), batch=batch,
                                    generator=torch.Generator().manual_seed(0))


def sample_of(system):
    return fpsolve.solve(system, "sequential").sample


def sequential_ddim_inversion(sampler, denoiser, x0):
    """The inverse loop written out: x_{t} from x_{t-1} with eps read at the less noisy state."""
    abar = sampler.state_alphas_cumprod()
    x = x0.clone()
    for i in range(sampler.num_steps, 0, -1):  # forward step i goes from state i-1 to state i
        now, nxt = abar[i - 1], abar[i]
        eps = denoiser(x, torch.full((x.shape[0],), sampler.timesteps[i - 1]))
        x0_hat = (x - (1 - nxt).sqrt() * eps) / nxt.sqrt()
        x = now.sqrt() * x0_hat + (1 - now).sqrt() * eps
    return x


@pytest.mark.parametrize("solver, window", [("taa", None), ("fp", None), ("newton", None), ("taa", 7)])
def test_ddim_inversion_equals_the_sequential_inverse_loop(solver, window):
    system = ddim_system(30)
    x0 = sample_of(system)
    want = sequential_ddim_inversion(system.sampler, MODEL, x0)
    solution = fpsolve.invert(system, x0, solver, tol=1e-12, window=window)
    assert solution.converged
    assert (solution.sample - want).abs().max() <= 1e-10
    assert solution.iterations < 30 or window is not None  # parallel: fewer rounds than steps
    assert torch.equal(solution.trajectory[0], x0) and torch.equal(solution.trajectory[-1], solution.sample)


@pytest.mark.parametrize("config", [dict(set_alpha_to_one=False, steps_offset=1),
                                    dict(set_alpha_to_one=True, timestep_spacing="trailing")])
def test_ddim_inversion_equals_diffusers_ddim_inverse_scheduler(config):
    diffusers = pytest.importorskip("diffusers")
    schedule = dict(clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    inverse = diffusers.DDIMInverseScheduler(**schedule, **config)
    forward = diffusers.DDIMScheduler(**schedule, **config)
    inverse.set_timesteps(25)
    forward.set_timesteps(25)
    # float64 schedule on both sides: the comparison is of the recurrences, not of float32 sqrt
    inverse.alphas_cumprod = inverse.alphas_cumprod.double()
    inverse.initial_alpha_cumprod = torch.as_tensor(inverse.initial_alpha_cumprod).double()
    x0 = torch.randn(2, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = x0.clone()
    for t in inverse.timesteps:
        want = inverse.step(MODEL(want, t.expand(2)), t, want).prev_sample
    sampler = DDIM(alphas_cumprod=inverse.alphas_cumprod, timesteps=forward.timesteps,
                   final_alpha_cumprod=float(forward.final_alpha_cumprod))
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=MODEL, shape=(DIM,), batch=2,
                                      generator=torch.Generator())
    got = fpsolve.invert(system, x0, "taa", tol=1e-12).sample
    assert (got - want).abs().max() <= 1e-10


@pytest.mark.parametrize("steps", [50, 100])
def test_exact_inversion_reproduces_x0_and_beats_ddim_inversion(steps):
    system = ddim_system(steps)
    x0 = sample_of(system)
    approximate = fpsolve.invert(system, x0, "taa", tol=1e-8)
    exact = fpsolve.invert(system, x0, "taa", exact=True, tol=1e-8)
    assert exact.converged
    exact_error = reconstruction_error(system, exact.sample, x0)
    # the forward replay amplifies each step's residual a little: 1e-7 at tol 1e-8 leaves margin
    assert exact_error <= 1e-7
    assert reconstruction_error(system, approximate.sample, x0) > 1e3 * exact_error
    reference = fpsolve.invert(system, x0, "sequential", exact=True, tol=1e-10)
    assert reference.converged
    assert (exact.sample - reference.sample).abs().max() <= 1e-5


def test_exact_inversion_with_a_window_and_each_solver():
    system = ddim_system(40)
    x0 = sample_of(system)
    for solver, window in [("fp", None), ("newton", None), ("taa", 10)]:
        solution = fpsolve.invert(system, x0, solver, exact=True, tol=1e-9, window=window)
        assert solution.converged, (solver, window)
        assert reconstruction_error(system, solution.sample, x0) <= 1e-7, (solver, window)


def test_layout_of_an_unbatched_sample():
    system = ddim_system(12, batch=None)
    x0 = sample_of(system)
    assert x0.shape == (DIM,)
    solution = fpsolve.invert(system, x0, tol=1e-10)
    assert solution.sample.shape == (DIM,) and solution.trajectory.shape == (13, DIM)
    batched = fpsolve.invert(system, torch.stack([x0, x0]), tol=1e-10)
    assert batched.sample.shape == (2, DIM)
    assert (batched.sample[1] - solution.sample).abs().max() <= 1e-9


def test_inverse_sampler_reverses_keys_and_levels():
    sampler = DDIM(alphas_cumprod=ALPHAS_CUMPROD, timesteps=spaced(6))
    inverse = InverseSampler(sampler)
    assert inverse.timesteps == tuple(reversed(sampler.timesteps))
    assert torch.equal(inverse.state_sigmas(), sampler.state_sigmas().flip(0))
    form, forward = inverse.affine_form(), sampler.affine_form()
    # undoing a step with eps frozen: u = (s - B e) / A
    product = form.state[1:, 0] * forward.state[1:, 0].flip(0)
    assert torch.allclose(product, torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("sampler, reason", [
    (DDIM(alphas_cumprod=ALPHAS_CUMPROD, timesteps=spaced(5), eta=0.5), "injects fresh noise"),
    (DDPM(alphas_cumprod=ALPHAS_CUMPROD, timesteps=spaced(5)), "injects fresh noise"),
    (DPMSolver(alphas_cumprod=ALPHAS_CUMPROD, timesteps=spaced(5), order=2), "multistep"),
])
@pytest.mark.parametrize("exact", [False, True])
def test_samplers_without_an_inverse_are_refused_with_the_reason(sampler, reason, exact):
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=MODEL, shape=(DIM,),
                                      generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedError, match=rf"invert\(system=\.\.\.\).*{reason}"):
        fpsolve.invert(system, torch.zeros(DIM), exact=exact)


def test_first_order_dpm_solver_inverts():
    sampler = DPMSolver(alphas_cumprod=MODEL.alphas_cumprod, timesteps=spaced(20), order=1,
                        final_alpha_cumprod=float(MODEL.alphas_cumprod[0]))
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=MODEL, shape=(DIM,), batch=2,
                                      generator=torch.Generator().manual_seed(0))
    x0 = sample_of(system)
    solution = fpsolve.invert(system, x0, exact=True, tol=1e-9)
    assert solution.converged and reconstruction_error(system, solution.sample, x0) <= 1e-7


def test_bad_arguments_are_refused():
    system = ddim_system(5)
    with pytest.raises(ShapeError, match=r"x0 must have shape"):
        fpsolve.invert(system, torch.zeros(2, DIM + 1))
    with pytest.raises(InvalidOptionError, match="exact must be True or False"):
        fpsolve.invert(system, torch.zeros(DIM), exact="yes")
    with pytest.raises(InvalidOptionError, match="'auto'"):
        fpsolve.invert(system, torch.zeros(DIM), exact=True, window="auto")
    with pytest.raises(InvalidOptionError, match="rms stopping rule"):
        fpsolve.invert(system, torch.zeros(DIM), exact=True, stopping="paradigms")


# -- Stable Diffusion ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    from fpsolve.integrations.diffusers.testing import tiny_sd_pipeline

    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", set_alpha_to_one=False,
                                        steps_offset=1, clip_sample=False)
    return tiny_sd_pipeline(scheduler, tmp_path_factory.mktemp("tokenizer"))


CALL = dict(prompt=["a cat", "a dog"], num_inference_steps=20, guidance_scale=1.0)


def test_stable_diffusion_exact_inversion_round_trip(sd):
    from fpsolve.integrations.diffusers import encode_image, invert, sample

    out, _ = sample(sd, generator=torch.Generator().manual_seed(0), output_type="pt", **CALL)
    latents, solution = invert(sd, out.images, exact=True, tol=1e-7, **CALL)
    assert solution.converged and latents.shape == (2, 4, 8, 8)
    back, replay = sample(sd, latents=latents, output_type="pt", tol=1e-8, **CALL)
    encoded = encode_image(sd, out.images)
    # float32 UNet and VAE: the replayed latents match the encoded ones to the amplified tolerance
    # (measured 1.6e-5 at tol 1e-7, latents of RMS 0.05)
    assert (replay.sample.to(encoded.dtype) - encoded).abs().max() <= 1e-4
    decoded, _ = sample(sd, latents=latents, output_type="pt", solver="sequential", **CALL)
    assert (decoded.images - back.images).abs().max() <= 1e-3


def test_stable_diffusion_ddim_inversion_matches_the_sequential_inverse_loop(sd):
    from fpsolve.integrations.diffusers import invert, sample

    image = sample(sd, generator=torch.Generator().manual_seed(1), output_type="pt", **CALL)[0].images
    sequential, _ = invert(sd, image, "sequential", **CALL)
    parallel, solution = invert(sd, image, "taa", tol=1e-9, **CALL)
    assert solution.iterations < CALL["num_inference_steps"]
    # the float32 UNet's own rounding is the floor (measured 4e-7)
    assert (parallel - sequential).abs().max() <= 1e-5


def test_stable_diffusion_refusals(sd):
    from fpsolve.integrations.diffusers import invert

    image = torch.zeros(2, 3, 16, 16)
    with pytest.raises(InvalidOptionError, match="latents"):
        invert(sd, image, latents=torch.zeros(2, 4, 8, 8), **CALL)
    with pytest.raises(ShapeError, match="image batch"):
        invert(sd, image[:1], **CALL)
    with pytest.raises(UnsupportedError, match="supports StableDiffusionPipeline"):
        invert(object(), image)


def test_stable_diffusion_with_a_multistep_scheduler_is_refused(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from fpsolve.integrations.diffusers import invert
    from fpsolve.integrations.diffusers.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(diffusers.DPMSolverMultistepScheduler(), tmp_path)
    reason = r"invert\(pipe=\.\.\.\).*DPMSolverMultistepScheduler.*multistep"
    with pytest.raises(UnsupportedError, match=reason):
        invert(pipe, torch.zeros(1, 3, 16, 16), prompt="a cat", num_inference_steps=5)


def test_stable_diffusion_ddim_inversion_equals_ddim_inverse_scheduler_in_v_prediction(sd):
    diffusers = pytest.importorskip("diffusers")
    from fpsolve.integrations.diffusers import encode_image, invert, sample

    image = sample(sd, generator=torch.Generator().manual_seed(2), output_type="pt", **CALL)[0].images
    inverse = diffusers.DDIMInverseScheduler.from_config(sd.scheduler.config)
    inverse.set_timesteps(CALL["num_inference_steps"])
    embeds, _ = sd.encode_prompt(CALL["prompt"], "cpu", 1, False)
    latents = encode_image(sd, image)
    with torch.no_grad():
        for t in inverse.timesteps:  # diffusers' own inversion loop (no guidance at scale 1)
            v = sd.unet(latents, t, encoder_hidden_states=embeds).sample
            latents = inverse.step(v, t, latents).prev_sample
    got, _ = invert(sd, image, "taa", tol=1e-9, **CALL)
    # v is converted to eps at the less noisy state's level, as the scheduler does (freezing v
    # itself instead differs by 0.05); measured 2e-7, the float32 UNet's floor
    assert (got - latents).abs().max() <= 1e-5


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(1, 25), window_fraction=st.floats(0.05, 1.0),
       solver=st.sampled_from(["taa", "fp", "newton"]), seed=st.integers(0, 2**16))
def test_property_ddim_inversion_is_the_sequential_inverse_for_any_window(steps, window_fraction, solver,
                                                                          seed):
    """The inverse recurrence is triangular: at tol -> 0 every solver and window reproduces it."""
    system = ddim_system(steps, batch=2)
    x0 = torch.randn(2, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    want = sequential_ddim_inversion(system.sampler, MODEL, x0)
    window = max(1, round(window_fraction * steps))
    got = fpsolve.invert(system, x0, solver, tol=1e-12, window=window)
    assert got.converged and got.iterations <= steps  # the safeguard bounds a triangular solve by T
    assert (got.sample - want).abs().max() <= 1e-9 * max(1.0, float(want.abs().max()))


def test_a_sampler_can_bring_its_own_inverse():
    calls = []

    class Custom(DDIM):
        def inverse_sampler(self, output_to_eps=None):
            calls.append(output_to_eps)
            return InverseSampler(self, output_to_eps)

    sampler = Custom(alphas_cumprod=MODEL.alphas_cumprod, timesteps=spaced(10))
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=MODEL, shape=(DIM,),
                                      generator=torch.Generator().manual_seed(0))
    x0 = sample_of(system)
    got = fpsolve.invert(system, x0, tol=1e-12).sample
    assert calls == [None]
    assert (got - sequential_ddim_inversion(sampler, MODEL, x0[None])[0]).abs().max() <= 1e-10


# -- flow-matching samplers: Euler run backwards ---------------------------------------------------


def _flow_problem(steps: int = 20, dim: int = 8):
    # Uneven float sigmas (a shifted schedule) make model times like 549.99...: read as integers
    # they would be truncated, so this also checks that the inverse keeps continuous model time.
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = 3 * sigmas / (1 + 2 * sigmas)
    weight = torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / dim**0.5
    calls = []

    def velocity(x, t):
        calls.append(t.clone())
        return torch.tanh(x @ weight) - 0.5 * x * (t.view(-1, 1) / 1000)

    sampler = fpsolve.samplers.FlowEuler(sigmas=sigmas, num_train_timesteps=1000)
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=velocity, shape=(dim,), batch=2,
                                      generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return system, sigmas, velocity, calls


def test_flow_euler_inversion_is_euler_run_backwards():
    # exact=False: x(sigma_{i-1}) = x(sigma_i) - (sigma_i - sigma_{i-1}) v(x(sigma_i), 1000 sigma_{i-1}):
    # the velocity read at the less noisy state with the noisier key, as DDIMInverseScheduler reads eps.
    system, sigmas, velocity, calls = _flow_problem()
    x0 = fpsolve.solve(system, "sequential").sample
    expected = [x0]
    for i in range(len(sigmas) - 1, 0, -1):
        t = torch.full((2,), float(sigmas[i - 1]) * 1000, dtype=torch.float64)
        expected.append(expected[-1] - (sigmas[i] - sigmas[i - 1]) * velocity(expected[-1], t))
    calls.clear()
    inverse = fpsolve.invert(system, x0, solver="taa", tol=1e-12)
    assert inverse.converged
    assert all(t.dtype == torch.float64 and not torch.equal(t, t.round()) for t in calls[:1])
    assert torch.allclose(inverse.trajectory, torch.stack(expected), rtol=0, atol=1e-10)


@pytest.mark.parametrize("solver", ["taa", "fp"])
def test_exact_flow_euler_inversion_reproduces_x0(solver):
    system, *_ = _flow_problem()
    x0 = fpsolve.solve(system, "sequential").sample
    approximate = fpsolve.invert(system, x0, solver=solver, tol=1e-12)
    exact = fpsolve.invert(system, x0, solver=solver, exact=True, tol=1e-12)
    assert exact.converged
    # measured on this problem: 2.5e-10 for exact (the float64 floor of the 20-step amplification),
    # 4e-2 for Euler run backwards (its frozen-velocity error)
    assert reconstruction_error(system, exact.sample, x0) < 1e-8
    assert reconstruction_error(system, approximate.sample, x0) > 1e-3
