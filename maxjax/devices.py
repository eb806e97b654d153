"""`--devices`: `cpu`, `gpu`, `gpu:0`, `gpu:0,1`, `cpu:0,1`, `tpu` -> JAX devices (several: tensor parallel over
them, `graph/mesh.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from maxjax.errors import UserError


@dataclass(frozen=True)
class DeviceSpec:
    platform: str | None
    """'cpu', 'gpu', 'tpu', or None for JAX's default backend."""
    ids: tuple[int, ...] = ()
    """Device ids on that platform; empty = the first one."""

    @classmethod
    def parse(cls, spec: str | None) -> DeviceSpec:
        if spec is None or spec in ("", "default"):
            return cls(None)
        platform, _, ids = spec.partition(":")
        platform = platform.strip().lower()
        if platform not in ("cpu", "gpu", "tpu"):
            raise UserError(f"--devices {spec}: unknown device kind {platform!r}: use cpu, gpu, gpu:0,1 or tpu")
        try:
            parsed = tuple(int(i) for i in ids.split(",")) if ids else ()
        except ValueError:
            raise UserError(f"--devices {spec}: device ids must be integers, as in gpu:0,1") from None
        return cls(platform, parsed)

    def select_all(self) -> list:
        """Every device of the platform, on every process (several processes, one program: `--coordinator`)."""
        import jax

        if self.ids:
            raise UserError("--devices with ids and --coordinator: every process's devices join the mesh; name only "
                            "the kind (--devices gpu)")
        return jax.devices(self.platform) if self.platform else jax.devices()

    def select(self) -> list:
        """The JAX devices named; a clear error when the platform or an id is not there."""
        import jax

        try:
            devices = jax.devices(self.platform) if self.platform else jax.devices()
        except RuntimeError:
            raise UserError(
                f"--devices {self.platform}: no {self.platform} backend is available here "
                f"(found {jax.default_backend()}); install maxjax[cuda12] for NVIDIA GPUs or use --devices cpu"
            ) from None
        if not self.ids:
            return [devices[0]]
        by_id = {d.id: d for d in devices}
        missing = [i for i in self.ids if i not in by_id]
        if missing:
            hint = (" (several CPU devices need XLA_FLAGS=--xla_force_host_platform_device_count=N)"
                    if self.platform == "cpu" else "")
            raise UserError(f"--devices: no {self.platform} device {missing[0]}; this machine has ids "
                            f"{sorted(by_id)}{hint}")
        if len(set(self.ids)) != len(self.ids):
            raise UserError(f"--devices: device ids {list(self.ids)} repeat one: name each once, as in gpu:0,1")
        return [by_id[i] for i in self.ids]
