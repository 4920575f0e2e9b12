/*
 * JPEG decoding through libjpeg(-turbo), the library Pillow uses, with Pillow's settings
 * (JDCT_ISLOW, fancy upsampling), so the pixels match the reference pipeline's.
 *
 * libjpeg reports fatal errors by calling error_exit, which must not return; the only
 * sound way to leave it is longjmp, which must not cross Rust frames. So all of the
 * libjpeg calls live here, behind one function that always returns a status code.
 */
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>

#include "jpeg_shim.h"

struct shim_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int truncated;
    char message[JMSG_LENGTH_MAX];
};

static void shim_error_exit(j_common_ptr cinfo) {
    struct shim_error *err = (struct shim_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* Warnings are ignored, as Pillow ignores them, except running out of data: Pillow
 * refuses a truncated file ("image file is truncated"), and libjpeg's memory source
 * reports that as JWRN_JPEG_EOF before padding the stream with a fake EOI. */
static void shim_emit_message(j_common_ptr cinfo, int msg_level) {
    struct shim_error *err = (struct shim_error *)cinfo->err;
    if (msg_level < 0) {
        if (cinfo->err->msg_code == JWRN_JPEG_EOF) {
            err->truncated = 1;
        }
        cinfo->err->num_warnings++;
    }
}

static void shim_output_message(j_common_ptr cinfo) { (void)cinfo; }

int shim_jpeg_decode(const unsigned char *data, size_t len, uint64_t max_pixels,
                     shim_get_buffer get_buffer, void *ctx, struct shim_jpeg_result *result) {
    struct jpeg_decompress_struct cinfo;
    struct shim_error jerr;

    memset(result, 0, sizeof *result);
    memset(&cinfo, 0, sizeof cinfo);
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = shim_error_exit;
    jerr.pub.emit_message = shim_emit_message;
    jerr.pub.output_message = shim_output_message;
    jerr.truncated = 0;
    jerr.message[0] = '\0';

    if (setjmp(jerr.jump)) {
        jpeg_destroy_decompress(&cinfo);
        snprintf(result->message, sizeof result->message, "%s", jerr.message);
        return SHIM_JPEG_ERROR;
    }

    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    if (jerr.truncated) {
        jpeg_destroy_decompress(&cinfo);
        return SHIM_JPEG_TRUNCATED;
    }
    result->width = cinfo.image_width;
    result->height = cinfo.image_height;
    if ((uint64_t)cinfo.image_width * (uint64_t)cinfo.image_height > max_pixels) {
        jpeg_destroy_decompress(&cinfo);
        return SHIM_JPEG_TOO_MANY_PIXELS;
    }

    /* CMYK and YCCK come out as CMYK (converted to RGB by the caller, as Pillow does);
     * grayscale, YCbCr and RGB straight as RGB (grayscale replicated, as Pillow's
     * L -> RGB conversion does). */
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        cinfo.out_color_space = JCS_CMYK;
    } else {
        cinfo.out_color_space = JCS_RGB;
    }
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    cinfo.scale_num = 1;
    cinfo.scale_denom = 1;

    jpeg_start_decompress(&cinfo);
    size_t stride = (size_t)cinfo.output_width * (size_t)cinfo.output_components;
    unsigned char *out = get_buffer(ctx, stride * cinfo.output_height);
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        snprintf(result->message, sizeof result->message, "cannot allocate the image buffer");
        return SHIM_JPEG_ERROR;
    }
    while (cinfo.output_scanline < cinfo.output_height && !jerr.truncated) {
        JSAMPROW row = out + (size_t)cinfo.output_scanline * stride;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    if (!jerr.truncated) {
        jpeg_finish_decompress(&cinfo);
    }
    result->width = cinfo.output_width;
    result->height = cinfo.output_height;
    result->components = (uint32_t)cinfo.output_components;
    jpeg_destroy_decompress(&cinfo);
    return jerr.truncated ? SHIM_JPEG_TRUNCATED : SHIM_JPEG_OK;
}
