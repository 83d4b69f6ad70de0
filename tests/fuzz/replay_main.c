/* replay_main.c — runs a libFuzzer target without libFuzzer (gcc builds, plain ctest).
 *
 * For every file in the seed directory: the file itself, then 300 deterministic mutations of it
 * (byte flips, truncations, duplicated spans, random bytes), each passed to
 * LLVMFuzzerTestOneInput.  Not coverage guided — scripts/test.sh also runs the real libFuzzer
 * build for a bounded time — but it makes every build exercise every parser on bad bytes. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t rng = 0x243f6a8885a308d3ull;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void mutate_and_run(const uint8_t *seed, size_t n) {
    LLVMFuzzerTestOneInput(seed, n);
    size_t cap = n * 2 + 64;
    uint8_t *buf = malloc(cap);
    for (int it = 0; it < 300; it++) {
        size_t m = n;
        memcpy(buf, seed, n);
        int k = 1 + (int)(next() % 4);
        for (int j = 0; j < k; j++) {
            switch (next() % 4) {
            case 0:
                if (m) buf[next() % m] ^= (uint8_t)(1u << (next() % 8));
                break;
            case 1:
                if (m) m = next() % m;
                break;
            case 2:
                if (m) buf[next() % m] = (uint8_t)next();
                break;
            case 3:
                if (m && m * 2 < cap) {
                    size_t a = next() % m, len = next() % (m - a + 1);
                    memmove(buf + a + len, buf + a, m - a);
                    m += len;
                }
                break;
            }
        }
        LLVMFuzzerTestOneInput(buf, m);
    }
    free(buf);
}

int main(int argc, char **argv) {
    int files = 0;
    for (int a = 1; a < argc; a++) {
        DIR *d = opendir(argv[a]);
        if (!d) {
            fprintf(stderr, "replay: cannot open seed directory %s\n", argv[a]);
            return 1;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", argv[a], e->d_name);
            FILE *f = fopen(path, "rb");
            if (!f) continue;
            fseek(f, 0, SEEK_END);
            long n = ftell(f);
            fseek(f, 0, SEEK_SET);
            uint8_t *buf = malloc((size_t)n + 1);
            if (fread(buf, 1, (size_t)n, f) != (size_t)n) n = 0;
            fclose(f);
            mutate_and_run(buf, (size_t)n);
            free(buf);
            files++;
        }
        closedir(d);
    }
    if (!files) {
        fprintf(stderr, "replay: no seed files\n");
        return 1;
    }
    printf("replayed %d seeds x 301 inputs\n", files);
    return 0;
}
