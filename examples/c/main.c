/* Link a model compiled by edgecc into a C program and run it.
 *
 *   edgecc model.onnx -O3 --runtime native -o build/model     (writes build/model.h, build/libmodel.a, ...)
 *   make MODEL_DIR=build && ./main [input.bin]
 *
 * For a model with one float32 input and one float32 output: reads the input from a raw little-endian file if one
 * is given (otherwise fills it with a fixed pattern), runs the model, prints one output value per line. */
#include <stdio.h>
#include <stdlib.h>

#include "model.h"

static float input[MODEL_INPUT0_ELEMENTS];
static float output[MODEL_OUTPUT0_ELEMENTS];
static unsigned char arena[MODEL_ARENA_BYTES + 1] __attribute__((aligned(64)));  /* +1: a model may need 0 bytes */

int main(int argc, char **argv) {
    if (argc > 1) {
        FILE *f = fopen(argv[1], "rb");
        if (!f || fread(input, 1, sizeof input, f) != sizeof input) {
            fprintf(stderr, "cannot read %lu bytes of input from %s\n", (unsigned long)sizeof input, argv[1]);
            return 1;
        }
        fclose(f);
    } else {
        for (unsigned i = 0; i < MODEL_INPUT0_ELEMENTS; ++i) input[i] = (float)((int)(i % 17) - 8) / 8.0f;
    }
    const void *inputs[] = {input};
    void *outputs[] = {output};
    int status = model_run(inputs, outputs, arena);
    if (status != 0) {
        fprintf(stderr, "model_run failed: %d\n", status);
        return 1;
    }
    for (unsigned i = 0; i < MODEL_OUTPUT0_ELEMENTS; ++i) printf("%.9g\n", output[i]);
    return 0;
}
