/* The fakes' launcher in C: what launch.py does, without the ~14 ms an interpreter takes to start.
 *
 * Built by the test session (warmfakes.build_native_launchers) into a directory of its own, as
 * `kind`, `docker` and `helm`, and put on PATH before tests/fakes/bin. It hands the call to the warm
 * fake server ($LAB_FAKE_WARM) in the same request launch.py sends: stdin/stdout/stderr and the
 * read end of a pipe whose write end only this process holds (the child dies when it closes), then
 * exits as the child did. Where the call cannot be handed over it runs the Python launcher
 * (FAKES_BIN/<tool>, with PYTHON -S), so the fake behaves the same either way.
 */
#define _GNU_SOURCE  /* pipe2 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef FAKES_BIN
#error "FAKES_BIN (tests/fakes/bin) must be defined"
#endif
#ifndef PYTHON
#error "PYTHON (the interpreter for the Python launcher) must be defined"
#endif

extern char **environ;

static void append(char **buf, size_t *len, size_t *cap, const char *word, int sep) {
    size_t n = strlen(word) + (sep ? 1 : 0);
    if (*len + n + 1 > *cap) {
        while (*len + n + 1 > *cap) *cap *= 2;
        *buf = realloc(*buf, *cap);
        if (!*buf) { perror("fake launcher"); _exit(70); }
    }
    if (sep) (*buf)[(*len)++] = '\0';
    memcpy(*buf + *len, word, n - (sep ? 1 : 0));
    *len += n - (sep ? 1 : 0);
}

/* 1 and *code set when the call was handed over, 0 when it must run here. */
static int hand_over(const char *address, const char *tool, const char *script, int argc,
                     char **argv, int *code) {
    struct stat st;
    for (int fd = 0; fd < 3; fd++)
        if (fstat(fd, &st) != 0) return 0;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(address) >= sizeof(sa.sun_path)) return 0;
    strcpy(sa.sun_path, address);
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof(cwd))) return 0;

    size_t cap = 4096, len = 0;
    char *buf = malloc(cap), count[16];
    if (!buf) return 0;
    snprintf(count, sizeof(count), "%d", argc - 1 + 3);  /* tool, cwd, argv0, arguments */
    append(&buf, &len, &cap, count, 0);
    append(&buf, &len, &cap, tool, 1);
    append(&buf, &len, &cap, cwd, 1);
    append(&buf, &len, &cap, script, 1);
    for (int i = 1; i < argc; i++) append(&buf, &len, &cap, argv[i], 1);
    for (char **e = environ; *e; e++) append(&buf, &len, &cap, *e, 1);

    /* close-on-exec: a call run here after all (execv below) inherits neither */
    int conn = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (conn < 0) { free(buf); return 0; }
    int alive[2];
    if (pipe2(alive, O_CLOEXEC) != 0) { close(conn); free(buf); return 0; }
    int fds[4] = {0, 1, 2, alive[0]};
    union {  /* aligned for a cmsghdr */
        char bytes[CMSG_SPACE(sizeof(fds))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof(control));
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes,
                         .msg_controllen = sizeof(control.bytes)};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(fds));
    memcpy(CMSG_DATA(cm), fds, sizeof(fds));
    if (connect(conn, (struct sockaddr *)&sa, sizeof(sa)) != 0 || sendmsg(conn, &msg, 0) < 0) {
        close(conn); close(alive[0]); close(alive[1]); free(buf);
        return 0;
    }
    free(buf);
    close(alive[0]);  /* alive[1] stays open until this process ends */

    char reply[64];
    ssize_t n;
    do n = recv(conn, reply, sizeof(reply) - 1, 0); while (n < 0 && errno == EINTR);
    if (n == 1 && reply[0] == 'r') {  /* the server could not start a child: run it here */
        close(conn); close(alive[1]);
        return 0;
    }
    if (n <= 1 || reply[0] != 'x') {
        fprintf(stderr, "fake %s: the warm fake server ended during the call\n", tool);
        *code = 70;
        return 1;
    }
    reply[n] = '\0';
    *code = atoi(reply + 1);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 1) return 127;
    const char *slash = strrchr(argv[0], '/');
    const char *tool = slash ? slash + 1 : argv[0];
    char script[PATH_MAX];
    snprintf(script, sizeof(script), "%s/%s", FAKES_BIN, tool);
    const char *address = getenv("LAB_FAKE_WARM");
    int code;
    if (address && *address && hand_over(address, tool, script, argc, argv, &code)) {
        if (code >= 0) _exit(code);
        signal(-code, SIG_DFL);
        kill(getpid(), -code);
        _exit(128 - code);
    }
    char **args = calloc((size_t)argc + 3, sizeof(char *));
    if (!args) return 70;
    args[0] = PYTHON;
    args[1] = "-S";
    args[2] = script;
    for (int i = 1; i < argc; i++) args[i + 2] = argv[i];
    execv(PYTHON, args);
    fprintf(stderr, "fake %s: cannot run %s: %s\n", tool, PYTHON, strerror(errno));
    return 127;
}
