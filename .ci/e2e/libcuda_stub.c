/* A stand-in libcuda.so.1 for CPU machines: SGLang's kernel package (sgl_kernel) links against
 * the CUDA driver and does not load without one, although SGLang's CPU engine never calls it.
 * Every entry point answers CUDA_ERROR_NO_DEVICE, so whatever asks finds no GPU. */
#define CUDA_ERROR_NO_DEVICE 100

typedef int CUresult;

CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_ERROR_NO_DEVICE; }
CUresult cuDriverGetVersion(int *version) { if (version) *version = 0; return CUDA_ERROR_NO_DEVICE; }
CUresult cuDeviceGetCount(int *count) { if (count) *count = 0; return CUDA_ERROR_NO_DEVICE; }
CUresult cuGetProcAddress(const char *symbol, void **fn, int version, unsigned long long flags) {
    (void)symbol; (void)version; (void)flags;
    if (fn) *fn = 0;
    return CUDA_ERROR_NO_DEVICE;
}
CUresult cuGetProcAddress_v2(const char *symbol, void **fn, int version, unsigned long long flags,
                             void *status) {
    (void)status;
    return cuGetProcAddress(symbol, fn, version, flags);
}
CUresult cuPointerGetAttribute(void *data, int attribute, unsigned long long ptr) {
    (void)data; (void)attribute; (void)ptr;
    return CUDA_ERROR_NO_DEVICE;
}
