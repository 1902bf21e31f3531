/* Block throughput probe for bench/disk.py: sequential 1 MiB and random
 * 4 KiB reads and writes with O_DIRECT on a file or block device, each for
 * a fixed time. Runs inside the guest (static, no libc beyond the binary)
 * and on the host for the limit. Usage: blkbench PATH SIZE_MIB SECONDS */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static int run(int fd, const char *name, size_t bs, int random, int write_,
               uint64_t size, double seconds, char *buf) {
    uint64_t blocks = size / bs, done = 0, pos = 0;
    double start = now(), t;
    do {
        uint64_t block = random ? next() % blocks : pos++ % blocks;
        ssize_t n = write_ ? pwrite(fd, buf, bs, block * bs) : pread(fd, buf, bs, block * bs);
        if (n != (ssize_t)bs) {
            perror(name);
            return 1;
        }
        done += bs;
        t = now() - start;
    } while (t < seconds);
    if (write_ && fdatasync(fd) != 0) {
        perror("fdatasync");
        return 1;
    }
    t = now() - start;
    printf("BLKBENCH %s %.1f MB/s %.0f IOPS\n", name, done / t / 1e6, done / bs / t);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: blkbench PATH SIZE_MIB SECONDS\n");
        return 2;
    }
    uint64_t size = strtoull(argv[2], NULL, 10) << 20;
    double seconds = atof(argv[3]);
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    char *buf;
    if (posix_memalign((void **)&buf, 4096, 1 << 20) != 0) return 1;
    memset(buf, 0x5a, 1 << 20);
    return run(fd, "seq-write-1M", 1 << 20, 0, 1, size, seconds, buf) ||
           run(fd, "seq-read-1M", 1 << 20, 0, 0, size, seconds, buf) ||
           run(fd, "rand-write-4K", 4096, 1, 1, size, seconds, buf) ||
           run(fd, "rand-read-4K", 4096, 1, 0, size, seconds, buf);
}
