/* Test aid (tests/e2e/test_clock_steps.py): shifts the wall clock of one
 * process, preloaded with LD_PRELOAD, by the whole seconds written in the
 * file named by IDEM_CLOCK_SHIFT_FILE, read again at every call. Only the
 * wall clock moves (CLOCK_REALTIME and its coarse twin, gettimeofday,
 * time); the monotonic clocks are left as they are, as a stepped system
 * clock would leave them.
 *
 * libfaketime does this too, but hangs Envoy at start-up: its constructor
 * looks symbols up, which allocates, and Envoy's tcmalloc reads the clock
 * while it initialises. This shim looks nothing up and allocates nothing:
 * every clock is read with the raw system call, and the file with raw
 * open/read/close. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static char shift_file[4096];

__attribute__((constructor)) static void remember_the_file(void) {
    extern char **environ;
    const char *prefix = "IDEM_CLOCK_SHIFT_FILE=";
    for (char **e = environ; e && *e; e++) {
        const char *p = prefix, *v = *e;
        while (*p && *v == *p) { p++; v++; }
        if (*p) continue;
        size_t i = 0;
        while (v[i] && i + 1 < sizeof shift_file) { shift_file[i] = v[i]; i++; }
        shift_file[i] = 0;
    }
}

static long shift_seconds(void) {
    if (!shift_file[0]) return 0;
    int fd = (int)syscall(SYS_open, shift_file, O_RDONLY);
    if (fd < 0) return 0;
    char buf[32];
    long n = syscall(SYS_read, fd, buf, sizeof buf - 1);
    syscall(SYS_close, fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    long sign = 1, value = 0;
    char *c = buf;
    if (*c == '+' || *c == '-') { sign = *c == '-' ? -1 : 1; c++; }
    while (*c >= '0' && *c <= '9') { value = value * 10 + (*c - '0'); c++; }
    return sign * value;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    long r = syscall(SYS_clock_gettime, clock, ts);
    if (r == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) {
        ts->tv_sec += shift_seconds();
    }
    return (int)r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0 && tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    (void)tz;
    return r;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
