/* The C ABI from C (tests/capi.rs compiles and runs it): reads a batch, runs the loss on the
 * CPU backend through include/supcon.h and writes what it got; checks the error statuses of
 * bad arguments on the way. Usage: check INPUT OUTPUT
 *
 * INPUT: uint64 B, V, D, positives kind, reduction, K; float features[B*V*D]; then int64
 * labels[B] (labels), float mask[B*B] (mask) or uint8 sets[B*K] (label sets).
 * OUTPUT: double loss, double per_anchor[R], float grad[B*V*D] (supcon_backward), float
 * grad[B*V*D] (supcon_forward_backward, upstream 1). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "supcon.h"

static int failures = 0;

static void expect(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "check failed: %s (last error: %s)\n", what, supcon_last_error());
        failures++;
    }
}

static void *read_all(FILE *file, size_t bytes) {
    void *data = malloc(bytes ? bytes : 1);
    if (!data || fread(data, 1, bytes, file) != bytes) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return data;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: check INPUT OUTPUT\n");
        return 2;
    }
    FILE *in = fopen(argv[1], "rb");
    if (!in) return 2;
    uint64_t head[6];
    if (fread(head, sizeof head, 1, in) != 1) return 2;
    size_t batch = head[0], views = head[1], dim = head[2], classes = head[5];
    uint32_t kind = (uint32_t)head[3], reduction = (uint32_t)head[4];
    size_t elements = batch * views * dim;
    float *features = read_all(in, elements * sizeof(float));
    size_t positive_bytes = kind == SUPCON_POSITIVES_LABELS ? batch * sizeof(int64_t)
                            : kind == SUPCON_POSITIVES_MASK ? batch * batch * sizeof(float)
                            : kind == SUPCON_POSITIVES_LABEL_SETS ? batch * classes
                                                                   : 0;
    void *positive_data = read_all(in, positive_bytes);
    fclose(in);

    size_t options_size = 0, positives_size = 0;
    expect(supcon_abi_sizes(&options_size, &positives_size) == SUPCON_OK, "abi sizes");
    expect(options_size == sizeof(SupconOptions), "sizeof(SupconOptions) agrees");
    expect(positives_size == sizeof(SupconPositives), "sizeof(SupconPositives) agrees");

    SupconOptions options;
    expect(supcon_options_default(&options) == SUPCON_OK, "default options");
    expect(options.temperature == 0.07 && options.reduction == SUPCON_REDUCTION_MEAN,
           "the paper's defaults");
    options.temperature = 0.1;
    options.base_temperature = 0.1;
    options.reduction = reduction;
    SupconPositives positives = {kind, SUPCON_SET_WEIGHT_JACCARD, positive_data, classes};

    /* Bad arguments: statuses and messages, nothing written. */
    SupconHandle *handle = NULL;
    SupconOptions bad = options;
    bad.temperature = 0.0;
    expect(supcon_new(&bad, SUPCON_BACKEND_CPU, &handle) == SUPCON_INVALID_ARGUMENT &&
               handle == NULL && strlen(supcon_last_error()) > 0,
           "a zero temperature is refused");
    bad = options;
    bad.denominator = 7;
    expect(supcon_new(&bad, SUPCON_BACKEND_CPU, &handle) == SUPCON_INVALID_ARGUMENT,
           "an unknown denominator is refused");
    expect(supcon_new(&options, 99, &handle) == SUPCON_INVALID_ARGUMENT, "an unknown backend");
    expect(supcon_new(NULL, SUPCON_BACKEND_CPU, &handle) == SUPCON_INVALID_ARGUMENT,
           "null options");
    int32_t cuda = supcon_new(&options, SUPCON_BACKEND_CUDA, &handle);
    expect(cuda == SUPCON_OK || cuda == SUPCON_NO_CUDA, "CUDA starts or says why not");
    if (cuda == SUPCON_OK) {
        expect(strcmp(supcon_backend_name(handle), "cuda") == 0, "the CUDA handle's name");
        supcon_free(handle);
        handle = NULL;
    }

    expect(supcon_new(&options, SUPCON_BACKEND_CPU, &handle) == SUPCON_OK, "a CPU handle");
    expect(strlen(supcon_last_error()) == 0, "a success clears the message");
    expect(strcmp(supcon_backend_name(handle), "cpu") == 0, "the handle's backend");
    size_t anchors = 0;
    expect(supcon_anchors(handle, batch, views, &anchors) == SUPCON_OK, "anchors");

    double loss = -1.0;
    expect(supcon_forward(NULL, features, SUPCON_F32, batch, views, dim, &positives, &loss,
                          NULL, NULL) == SUPCON_INVALID_ARGUMENT && loss == -1.0,
           "a null handle");
    expect(supcon_forward(handle, NULL, SUPCON_F32, batch, views, dim, &positives, &loss, NULL,
                          NULL) == SUPCON_INVALID_ARGUMENT,
           "null features");
    expect(supcon_forward(handle, features, 42, batch, views, dim, &positives, &loss, NULL,
                          NULL) == SUPCON_INVALID_ARGUMENT,
           "an unknown dtype");
    if (kind != SUPCON_POSITIVES_SIMCLR) {
        SupconPositives missing = positives;
        missing.data = NULL;
        expect(supcon_forward(handle, features, SUPCON_F32, batch, views, dim, &missing, &loss,
                              NULL, NULL) == SUPCON_INVALID_ARGUMENT,
               "positives without data");
    }
    expect(supcon_forward(handle, features, SUPCON_F32, batch, views, 0, &positives, &loss,
                          NULL, NULL) == SUPCON_INVALID_ARGUMENT,
           "an empty dimension");
    expect(loss == -1.0, "failed calls write nothing");

    double *per_anchor = malloc(anchors * sizeof(double));
    SupconState *state = NULL;
    expect(supcon_forward(handle, features, SUPCON_F32, batch, views, dim, &positives, &loss,
                          per_anchor, &state) == SUPCON_OK && state != NULL,
           "the forward pass");
    size_t upstream_len = reduction == SUPCON_REDUCTION_NONE ? anchors : 1;
    double *upstream = malloc(upstream_len * sizeof(double));
    for (size_t i = 0; i < upstream_len; i++) upstream[i] = 1.0;
    float *grad = malloc(elements * sizeof(float));
    float *fused = malloc(elements * sizeof(float));
    expect(supcon_backward(handle, state, features, SUPCON_F32, batch, views, dim, &positives,
                           upstream, upstream_len + 1, grad) == SUPCON_INVALID_ARGUMENT,
           "an upstream of the wrong length");
    expect(supcon_backward(handle, state, features, SUPCON_F32, batch, views, dim, &positives,
                           upstream, upstream_len, NULL) == SUPCON_INVALID_ARGUMENT,
           "a null gradient");
    expect(supcon_backward(handle, state, features, SUPCON_F32, batch, views, dim, &positives,
                           upstream, upstream_len, grad) == SUPCON_OK,
           "the backward pass");
    double fused_loss = 0.0;
    expect(supcon_forward_backward(handle, features, SUPCON_F32, batch, views, dim, &positives,
                                   &fused_loss, fused) == SUPCON_OK && fused_loss == loss,
           "forward and backward in one call");

    FILE *out = fopen(argv[2], "wb");
    if (!out) return 2;
    fwrite(&loss, sizeof loss, 1, out);
    fwrite(per_anchor, sizeof(double), anchors, out);
    fwrite(grad, sizeof(float), elements, out);
    fwrite(fused, sizeof(float), elements, out);
    fclose(out);

    supcon_state_free(state);
    supcon_free(handle);
    supcon_free(NULL);
    supcon_state_free(NULL);
    free(features);
    free(positive_data);
    free(per_anchor);
    free(upstream);
    free(grad);
    free(fused);
    return failures ? 1 : 0;
}
