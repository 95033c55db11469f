// The floor of a group freeze (bench/group_floor.py builds and runs this): FIFREEZE the
// given filesystems (the bench's own loop filesystems only), then FITHAW them, REPS times.
// usage: group_floor MODE REPS EXPEDITE(0/1) MNT...
//   MODE serial: one thread, one after another; spawn: a thread started per volume per
//   wave; pool: one parked thread per volume (futex), woken together; pool2: two parked
//   threads, each doing half the volumes.
//   EXPEDITE 1: rcu_expedited=1 before the first FIFREEZE if it is 0, restored after the
//   last one returns (as quiesce does; the restore is inside the window).
// prints per rep: freeze_us (first start -> last freeze end), gap_us (last freeze end ->
// first thaw start), thaw_us, window_us (first freeze start -> last thaw end)
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int nv, fds[16];
static long long t_start[16], t_end[16];
static int op;  // FIFREEZE or FITHAW
static _Atomic int gen, done;
static int nthreads, per_thread;

static long long now(void) {
  struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static void fx_wait(_Atomic int *a, int v) { syscall(SYS_futex, a, FUTEX_WAIT_PRIVATE, v, 0, 0, 0); }
static void fx_wake(_Atomic int *a) { syscall(SYS_futex, a, FUTEX_WAKE_PRIVATE, 1 << 30, 0, 0, 0); }

static void do_one(int i) {
  t_start[i] = now();
  if (ioctl(fds[i], op, 0) != 0) { perror("ioctl"); _exit(3); }
  t_end[i] = now();
}
static void *spawn_fn(void *a) { do_one((int)(long)a); return 0; }
static void *pool_fn(void *a) {
  int k = (int)(long)a, g = 0;
  for (;;) {
    while (atomic_load(&gen) == g) fx_wait(&gen, g);
    g = atomic_load(&gen);
    if (g < 0) return 0;
    for (int j = 0; j < per_thread; j++) { int i = k * per_thread + j; if (i < nv) do_one(i); }
    if (atomic_fetch_add(&done, 1) + 1 == nthreads) fx_wake(&done);
  }
}
static void set_rcu(const char *v) {
  int fd = open("/sys/kernel/rcu_expedited", O_WRONLY);
  if (fd >= 0) { write(fd, v, 1); close(fd); }
}
static int read_rcu(void) {
  char c = '?'; int fd = open("/sys/kernel/rcu_expedited", O_RDONLY);
  if (fd >= 0) { read(fd, &c, 1); close(fd); }
  return c;
}
static const char *mode;
static pthread_t th[16];
static void run_op(int o) {
  op = o;
  if (!strcmp(mode, "serial")) { for (int i = 0; i < nv; i++) do_one(o == FIFREEZE ? i : nv - 1 - i); return; }
  if (!strcmp(mode, "spawn")) {
    for (int i = 1; i < nv; i++) pthread_create(&th[i], 0, spawn_fn, (void *)(long)i);
    do_one(0);
    for (int i = 1; i < nv; i++) pthread_join(th[i], 0);
    return;
  }
  // pool variants: workers parked on gen; the caller waits on done
  atomic_store(&done, 0);
  atomic_fetch_add(&gen, 1); fx_wake(&gen);
  int d;
  while ((d = atomic_load(&done)) != nthreads) fx_wait(&done, d);
}
int main(int argc, char **argv) {
  mode = argv[1]; int reps = atoi(argv[2]); int exp = atoi(argv[3]);
  nv = argc - 4;
  for (int i = 0; i < nv; i++) { fds[i] = open(argv[4 + i], O_RDONLY | O_DIRECTORY); if (fds[i] < 0) { perror(argv[4 + i]); return 2; } }
  if (!strcmp(mode, "pool")) { nthreads = nv; per_thread = 1; }
  else if (!strcmp(mode, "pool2")) { nthreads = nv < 2 ? nv : 2; per_thread = (nv + 1) / 2; }
  if (nthreads) for (int k = 0; k < nthreads; k++) pthread_create(&th[k], 0, pool_fn, (void *)(long)k);
  usleep(100000);
  for (int r = 0; r < reps; r++) {
    usleep(150000 + (rand() % 50000));
    int set = 0;
    if (exp && read_rcu() == '0') { set_rcu("1"); set = 1; }
    run_op(FIFREEZE);
    long long f0 = t_start[0], f1 = t_end[0];
    for (int i = 0; i < nv; i++) { if (t_start[i] < f0) f0 = t_start[i]; if (t_end[i] > f1) f1 = t_end[i]; }
    if (set) set_rcu("0");
    run_op(FITHAW);
    long long h0 = t_start[0], h1 = t_end[0];
    for (int i = 0; i < nv; i++) { if (t_start[i] < h0) h0 = t_start[i]; if (t_end[i] > h1) h1 = t_end[i]; }
    printf("%lld %lld %lld %lld\n", (f1 - f0) / 1000, (h0 - f1) / 1000, (h1 - h0) / 1000, (h1 - f0) / 1000);
    fflush(stdout);
  }
  if (nthreads) { atomic_store(&gen, -1); fx_wake(&gen); for (int k = 0; k < nthreads; k++) pthread_join(th[k], 0); }
  return 0;
}
