/* The floor of `quiesce exec M -- true` in C: what the window costs with no Python.
 *
 * Not a test. Run by bench/exec_window.py --floor-c (which makes the loop filesystem and,
 * for the expedited rows, holds rcu_expedited through quiesce's own record): usage
 *   exec_floor MOUNTPOINT N sh|direct
 * Each of N runs: a child is forked before the window and blocks reading a pipe
 * ("sh": quiesce's gate, `/bin/sh -c 'IFS= read -r _ || exit 125; exec "$@"'`;
 * "direct": the child itself reads, then execs), then
 *   t0 FIFREEZE  t1 write one byte  (the child execs /usr/bin/true and exits)
 *   poll(pidfd) t2  FIFREEZE probe (EBUSY)  FITHAW t3
 * and prints one line per run: window freeze command thaw (ms).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: exec_floor MOUNTPOINT N sh|direct\n");
        return 2;
    }
    int n = atoi(argv[2]);
    int via_sh = strcmp(argv[3], "sh") == 0;
    int fd = open(argv[1], O_RDONLY | O_DIRECTORY);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    for (int i = 0; i < n; i++) {
        int gate[2];
        if (pipe(gate) != 0) return 1;
        pid_t pid = fork();
        if (pid == 0) {
            dup2(gate[0], 0);
            close(gate[0]);
            close(gate[1]);
            if (via_sh) {
                execl("/bin/sh", "sh", "-c", "IFS= read -r _ || exit 125; exec \"$@\"",
                      "quiesce-gate", "/usr/bin/true", (char *)NULL);
            } else {
                char c;
                if (read(0, &c, 1) != 1) _exit(125);
                execl("/usr/bin/true", "true", (char *)NULL);
            }
            _exit(127);
        }
        close(gate[0]);
        int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        syncfs(fd);
        usleep(20000); /* the child is parked in read() by now */
        double t0 = now_ms();
        if (ioctl(fd, FIFREEZE, 0) != 0) {
            perror("FIFREEZE");
            return 1;
        }
        double t1 = now_ms();
        if (write(gate[1], "\n", 1) != 1) return 1;
        struct pollfd p = {.fd = pidfd, .events = POLLIN};
        poll(&p, 1, 10000);
        double t2 = now_ms();
        int probe = ioctl(fd, FIFREEZE, 0) == 0 ? 0 : errno;
        if (probe != EBUSY) {
            fprintf(stderr, "probe: %d\n", probe);
            return 1;
        }
        if (ioctl(fd, FITHAW, 0) != 0) {
            perror("FITHAW");
            return 1;
        }
        double t3 = now_ms();
        siginfo_t si;
        waitid(P_PID, pid, &si, WEXITED);
        close(gate[1]);
        close(pidfd);
        printf("%.4f %.4f %.4f %.4f\n", t3 - t0, t1 - t0, t2 - t1, t3 - t2);
    }
    return 0;
}
