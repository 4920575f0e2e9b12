#ifndef JPEG_SHIM_H
#define JPEG_SHIM_H

#include <stddef.h>
#include <stdint.h>

#define SHIM_JPEG_OK 0
#define SHIM_JPEG_ERROR 1
#define SHIM_JPEG_TRUNCATED 2
#define SHIM_JPEG_TOO_MANY_PIXELS 3

struct shim_jpeg_result {
    uint32_t width;
    uint32_t height;
    uint32_t components; /* 3 = RGB, 4 = CMYK (Adobe-inverted, as stored) */
    char message[200];
};

/* Returns a buffer of at least `len` bytes, or NULL. */
typedef unsigned char *(*shim_get_buffer)(void *ctx, size_t len);

int shim_jpeg_decode(const unsigned char *data, size_t len, uint64_t max_pixels,
                     shim_get_buffer get_buffer, void *ctx, struct shim_jpeg_result *result);

#endif
