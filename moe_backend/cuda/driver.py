"""Loading and launching the JIT's cubins through the CUDA driver API (`cuda-python`): one
module per (binary, device) in the device's primary context (the one torch's runtime uses),
launched with cuLaunchKernelEx so a cluster shape can be given."""

from __future__ import annotations

import ctypes
import threading

from moe_backend.cuda.jit import JITError, KernelSpec, compile_cubin, env_flags

__all__ = ["CompiledKernel", "load_kernel", "bindings", "check"]


def bindings():
    """cuda-python's driver module (imported at first use: the package imports without it)."""
    try:
        from cuda.bindings import driver  # noqa: PLC0415
    except ImportError:
        try:
            from cuda import cuda as driver  # noqa: PLC0415 - cuda-python < 12.6 spelling
        except ImportError as e:
            raise JITError(
                "the CUDA kernels are loaded through cuda-python's driver bindings: "
                "pip install 'cuda-python>=12.4' (or cuda-bindings)"
            ) from e
    return driver


def check(result):
    """Unwraps a cuda-python (err, *values) tuple, raising JITError with the driver's error name."""
    driver = bindings()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise JITError(f"CUDA driver error {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class CompiledKernel:
    """A loaded CUfunction plus the launch plumbing (kernel params as a void*[] built with ctypes,
    cuLaunchKernelEx so a cluster shape can be given)."""

    def __init__(self, spec: KernelSpec, cubin: bytes) -> None:
        driver = bindings()
        self.spec = spec
        self._cubin = cubin  # the driver may keep reading the image
        self.module = check(driver.cuModuleLoadData(cubin))
        self.function = check(driver.cuModuleGetFunction(self.module, spec.kernel_name.encode()))
        self._smem_attr = 0
        self._max_clusters: dict[tuple, int] = {}
        self._launch_configs: dict[tuple, object] = {}  # (grid, block, smem, cluster, stream) -> config
        self._lock = threading.Lock()

    def set_max_dynamic_smem(self, nbytes: int) -> None:
        if nbytes > self._smem_attr:
            with self._lock:
                driver = bindings()
                check(
                    driver.cuFuncSetAttribute(
                        self.function,
                        driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        nbytes,
                    )
                )
                self._smem_attr = nbytes

    def max_active_clusters(self, block: tuple[int, int, int], smem: int, cluster: tuple[int, int, int]) -> int:
        """How many clusters of this shape can be resident at once (cuOccupancyMaxActiveClusters);
        a persistent grid must not exceed it, or the extra clusters run after the others finish."""
        key = (block, smem, cluster)
        cached = self._max_clusters.get(key)
        if cached is None:
            driver = bindings()
            self.set_max_dynamic_smem(smem)
            config = _launch_config(driver, cluster, block, smem, cluster)
            cached = self._max_clusters[key] = int(check(driver.cuOccupancyMaxActiveClusters(self.function, config)))
        return cached

    def launch(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        smem: int,
        stream: int,
        params: list[ctypes._SimpleCData | ctypes.Array],
        cluster: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        driver = bindings()
        key = (grid, block, smem, cluster, stream)
        config = self._launch_configs.get(key)
        if config is None:  # building one is a dozen driver-binding objects: once per shape and stream
            self.set_max_dynamic_smem(smem)
            config = _launch_config(driver, grid, block, smem, cluster)
            config.hStream = driver.CUstream(stream)
            if len(self._launch_configs) >= 256:
                self._launch_configs.clear()
            self._launch_configs[key] = config
        # void*[]: one pointer per parameter, each to the bytes the driver copies for it.
        ptrs = (ctypes.c_void_p * len(params))(*(ctypes.addressof(p) for p in params))
        check(driver.cuLaunchKernelEx(config, self.function, ctypes.addressof(ptrs), 0))


def _launch_config(
    driver, grid: tuple[int, int, int], block: tuple[int, int, int], smem: int, cluster: tuple[int, int, int]
):
    """A CUlaunchConfig with the cluster-dimension attribute (1x1x1 when not clustering)."""
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid
    config.blockDimX, config.blockDimY, config.blockDimZ = block
    config.sharedMemBytes = smem
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster
    config.attrs = [attr]
    config.numAttrs = 1
    return config


_loaded: dict[tuple, CompiledKernel] = {}
_load_lock = threading.Lock()
_primary_contexts: dict[int, object] = {}


def _ensure_context(device_index: int) -> None:
    """Makes the device's primary context (the one torch's runtime uses) current on this thread."""
    driver = bindings()
    primary = _primary_contexts.get(device_index)
    if primary is None:
        check(driver.cuInit(0))
        dev = check(driver.cuDeviceGet(device_index))
        primary = _primary_contexts[device_index] = check(driver.cuDevicePrimaryCtxRetain(dev))
    current = check(driver.cuCtxGetCurrent())
    if current is None or int(current) != int(primary):
        check(driver.cuCtxSetCurrent(primary))


def load_kernel(spec: KernelSpec, device_index: int) -> CompiledKernel:
    """Compile (or find cached) and load `spec` on a device. Memoized in-process on what names
    the binary, so the launch path never re-hashes sources or re-reads the cache."""
    memo = (spec.family, spec.kernel_name, spec.source, spec.arch, spec.flags, env_flags(), device_index)
    kernel = _loaded.get(memo)
    if kernel is None:
        with _load_lock:  # load once per (binary, device) across threads
            kernel = _loaded.get(memo)
            if kernel is None:
                cubin = compile_cubin(spec)
                _ensure_context(device_index)
                kernel = _loaded[memo] = CompiledKernel(spec, cubin.read_bytes())
    return kernel
