/*
 * FastAGI load generator for bench/admission.py, part (2): Asterisk's side of each call's
 * life, paced, from one thread on epoll, so that the load generator takes as little of the
 * machine's CPU as Asterisk itself would for the same work (the Python one took 17-25 % of a
 * core at 500 calls/s, and its own event loop's delays were counted in every admission).
 *
 * For call i (0 <= i < rate * seconds), at t0 + i / rate:
 *   connect to the agent's FastAGI port, send the agi_* environment of `admit` with the
 *   call's arguments, answer "200 result=1" to every SET VARIABLE (unpacking PBX_R as the
 *   dialplan does) and stop the clock when the agent ends its side of the connection;
 *   admitted: raise the answer as the dialplan's pbx-answered does (AMI UserEvent
 *   PbxAnswered) and after `hold` seconds append the call's line to the node's CDR file, as
 *   Asterisk writes it (asterisk-conf/cdr_custom.conf); refused: append its FAILED line now.
 *
 * Usage: agi_load PORT RATE SECONDS HOLD NODE STAMP CARRIER CALLS_FILE CDR_FILE
 *                 AMI_HOST AMI_PORT AMI_USER AMI_SECRET SCRIPT
 * SCRIPT: the FastAGI script path, "<the node's token>/admit" (controlplane's node_token).
 * CALLS_FILE: one call per line, cycled through: "code number tenant direction dialled".
 * Prints "paced SENT SECONDS CPU_SECONDS" when the last call was placed (the caller samples
 * CPU then; CPU_SECONDS: this process's own so far),
 * then one line per call, "call I LATENCY_US LATE_US DECISION SIP_CODE REASON" (DECISION:
 * admit, refuse, none or error:WHAT), then "done". Exit status 0, or 2 on bad arguments or
 * when the AMI login fails.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CALLERS 10000
#define BUF 4096
#define IO_BUF 1024

struct caller { char code[32], number[32], tenant[16], direction[16], dialled[40]; };

struct call {
    int fd, index, done;
    double start_wall, t0, late;      /* wall clock at start; monotonic at connect */
    char in[IO_BUF]; size_t in_len;
    char out[IO_BUF]; size_t out_len, out_off;
    char decision[16], sip_code[8], reason[64], call_id[64];
};

struct pending { double due, start_wall, answered_wall; int index; char call_id[64]; };

static struct caller callers[MAX_CALLERS];
static int n_callers;
static FILE *cdr;
static int ami_fd = -1;
static const char *node, *stamp, *carrier, *script;
static double hold;

static double mono(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double wall(void) {
    struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void cdr_line(const char *uniqueid, const char *call_id, double start, double answer,
                     double end, const char *disposition, const struct caller *c,
                     const char *reason, const char *sip_code, const char *direction) {
    long billsec = answer > 0 ? (long)(end - answer) : 0;
    char answered[32];
    if (answer > 0) snprintf(answered, sizeof answered, "%.6f", answer);
    else strcpy(answered, "0.000000");
    fprintf(cdr, "\"%s\",\"0\",\"%s\",\"%.6f\",\"%s\",\"%.6f\",\"%ld\",\"%ld\",\"%s\",\"%s\","
                 "\"%s\",\"%s\",\"%s\",\"%s\",\"%s\",\"%s\"\n",
            uniqueid, call_id, start, answered, end, (long)(end - start), billsec, disposition,
            c->number, c->dialled, reason, sip_code, c->tenant, c->code, direction);
    fflush(cdr);
}

static void uniqueid_of(int index, char *out, size_t size) {
    snprintf(out, size, "%s-agi%s.%d", node, stamp, index);
}

/* One SET VARIABLE line's name and unquoted value into the call's decision. */
static void set_variable(struct call *k, char *name, char *value) {
    size_t len = strlen(value);
    if (len >= 2 && value[0] == '"' && value[len - 1] == '"') {
        value[len - 1] = 0; value++;
        char *w = value;
        for (char *r = value; *r; r++) {
            if (*r == '\\' && (r[1] == '"' || r[1] == '\\')) r++;
            *w++ = *r;
        }
        *w = 0;
    }
    char names[BUF], values[BUF];
    if (strcmp(name, "PBX_R") == 0) {  /* "N1,N2|v1,v2": as the dialplan's ARRAY splits it */
        char *bar = strchr(value, '|');
        if (!bar) return;
        *bar = 0;
        snprintf(names, sizeof names, "%s", value);
        snprintf(values, sizeof values, "%s", bar + 1);
    } else {
        snprintf(names, sizeof names, "%s", name);
        snprintf(values, sizeof values, "%s", value);
    }
    char *ns = names, *vs = values;
    while (ns) {
        char *nn = strchr(ns, ','); if (nn) *nn++ = 0;
        char *vn = vs ? strchr(vs, ',') : NULL; if (vn) *vn++ = 0;
        const char *v = vs ? vs : "";
        if (!strcmp(ns, "PBX_DECISION")) snprintf(k->decision, sizeof k->decision, "%s", v);
        else if (!strcmp(ns, "PBX_SIP_CODE")) snprintf(k->sip_code, sizeof k->sip_code, "%s", v);
        else if (!strcmp(ns, "PBX_REASON")) snprintf(k->reason, sizeof k->reason, "%s", v);
        else if (!strcmp(ns, "PBX_CALL")) snprintf(k->call_id, sizeof k->call_id, "%s", v);
        ns = nn; vs = vn;
    }
}

static void queue_out(struct call *k, const char *data) {
    size_t len = strlen(data);
    if (k->out_len + len > sizeof k->out) return;
    memcpy(k->out + k->out_len, data, len);
    k->out_len += len;
}

static void flush_out(struct call *k) {
    while (k->out_off < k->out_len) {
        ssize_t n = write(k->fd, k->out + k->out_off, k->out_len - k->out_off);
        if (n <= 0) return;  /* EAGAIN: EPOLLOUT finishes it; an error: the read side sees it */
        k->out_off += (size_t)n;
    }
    k->out_len = k->out_off = 0;
}

static void ami_write(const char *data) {
    size_t len = strlen(data), off = 0;
    while (off < len) {
        ssize_t n = write(ami_fd, data + off, len - off);
        if (n > 0) { off += (size_t)n; continue; }
        if (n < 0 && errno == EAGAIN) { struct timespec ts = {0, 100000}; nanosleep(&ts, NULL); continue; }
        return;
    }
}

static int ami_login(const char *host, int port, const char *user, const char *secret) {
    ami_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    struct timeval tv = {10, 0};
    setsockopt(ami_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(ami_fd, (struct sockaddr *)&a, sizeof a) < 0) return -1;
    char buf[BUF], msg[512];
    snprintf(msg, sizeof msg, "Action: Login\r\nUsername: %s\r\nSecret: %s\r\nEvents: off\r\n\r\n",
             user, secret);
    ami_write(msg);
    size_t got = 0;
    while (got < sizeof buf - 1) {  /* the banner, then the login's reply */
        ssize_t n = read(ami_fd, buf + got, sizeof buf - 1 - got);
        if (n <= 0) return -1;
        got += (size_t)n; buf[got] = 0;
        if (strstr(buf, "Success")) break;
        if (strstr(buf, "Error")) return -1;
    }
    fcntl(ami_fd, F_SETFL, fcntl(ami_fd, F_GETFL) | O_NONBLOCK);
    int one = 1;
    setsockopt(ami_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return 0;
}

static char *env_of(int index, int port, char *out, size_t size) {
    const struct caller *c = &callers[index % n_callers];
    char uniqueid[96]; uniqueid_of(index, uniqueid, sizeof uniqueid);
    /* the arguments in the script's path, as the node's dialplan sends them */
    char script_path[512];
    snprintf(script_path, sizeof script_path, "%s/%s/%s/%s/%s", script, c->tenant,
             c->direction, c->dialled, c->code);
    snprintf(out, size,
             "agi_network: yes\nagi_network_script: %s\n"
             "agi_request: agi://127.0.0.1:%d/%s\nagi_channel: PJSIP/%s-%08x\n"
             "agi_language: en\nagi_type: PJSIP\nagi_uniqueid: %s\n"
             "agi_version: 22.0.0\nagi_callerid: %s\nagi_calleridname: Caller\n"
             "agi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\nagi_callingtns: 0\n"
             "agi_dnid: unknown\nagi_rdnis: unknown\nagi_context: pbx-call\n"
             "agi_extension: s\nagi_priority: 10\nagi_enhanced: 0.0\nagi_accountcode: \n"
             "agi_threadid: 140000000000000\n\n",
             script_path, port, script_path, c->code, (unsigned)index, uniqueid, c->number);
    return out;
}

int main(int argc, char **argv) {
    if (argc != 15) {
        fprintf(stderr, "usage: agi_load PORT RATE SECONDS HOLD NODE STAMP CARRIER CALLS_FILE "
                        "CDR_FILE AMI_HOST AMI_PORT AMI_USER AMI_SECRET SCRIPT\n");
        return 2;
    }
    script = argv[14];
    int port = atoi(argv[1]);
    double rate = atof(argv[2]), seconds = atof(argv[3]);
    hold = atof(argv[4]); node = argv[5]; stamp = argv[6]; carrier = argv[7];
    int total = (int)(rate * seconds);
    if (port <= 0 || rate <= 0 || total <= 0) { fprintf(stderr, "bad arguments\n"); return 2; }
    FILE *cf = fopen(argv[8], "r");
    if (!cf) { perror(argv[8]); return 2; }
    while (n_callers < MAX_CALLERS) {
        struct caller *c = &callers[n_callers];
        if (fscanf(cf, "%31s %31s %15s %15s %39s", c->code, c->number, c->tenant,
                   c->direction, c->dialled) != 5) break;
        n_callers++;
    }
    fclose(cf);
    if (!n_callers) { fprintf(stderr, "no calls in %s\n", argv[8]); return 2; }
    cdr = fopen(argv[9], "a");
    if (!cdr) { perror(argv[9]); return 2; }
    if (ami_login(argv[10], atoi(argv[11]), argv[12], argv[13]) < 0) {
        fprintf(stderr, "AMI login to %s:%s failed\n", argv[10], argv[11]);
        return 2;
    }
    struct call **calls = calloc((size_t)total, sizeof *calls);
    double *latency = calloc((size_t)total, sizeof *latency);
    struct pending *pend = calloc((size_t)total, sizeof *pend);
    int pend_head = 0, pend_tail = 0;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ami_fd, &ev);
    struct sockaddr_in agent = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &agent.sin_addr);

    int sent = 0, finished = 0;
    double t0 = mono(), paced_at = 0, give_up = 0;
    char env[BUF], line[BUF];
    struct epoll_event events[256];
    while (finished < total || pend_head < pend_tail) {
        double now = mono();
        /* place every call that is due */
        while (sent < total && t0 + sent / rate <= now) {
            struct call *k = calloc(1, sizeof *k);
            k->index = sent; k->late = now - (t0 + sent / rate);
            k->start_wall = wall();
            k->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            int one = 1;
            setsockopt(k->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            k->t0 = mono();
            calls[sent] = k;
            int rc = connect(k->fd, (struct sockaddr *)&agent, sizeof agent);
            if (rc < 0 && errno != EINPROGRESS) {
                snprintf(k->decision, sizeof k->decision, "error:connect");
                close(k->fd); k->fd = -1; k->done = 1; finished++;
            } else {
                queue_out(k, env_of(sent, port, env, sizeof env));
                struct epoll_event ce = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = k};
                epoll_ctl(ep, EPOLL_CTL_ADD, k->fd, &ce);
            }
            sent++;
            if (sent == total) {
                paced_at = mono();
                struct rusage ru; getrusage(RUSAGE_SELF, &ru);
                printf("paced %d %.6f %.6f\n", sent, paced_at - t0,
                       ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec
                       + ru.ru_stime.tv_usec / 1e6);
                fflush(stdout);
                give_up = paced_at + hold + 30;
            }
        }
        /* CDR lines of calls whose hold ended */
        while (pend_head < pend_tail && pend[pend_head].due <= now) {
            struct pending *p = &pend[pend_head++];
            const struct caller *c = &callers[p->index % n_callers];
            char uniqueid[96]; uniqueid_of(p->index, uniqueid, sizeof uniqueid);
            cdr_line(uniqueid, p->call_id, p->start_wall, p->answered_wall, wall(), "ANSWERED",
                     c, "", "", strcmp(c->direction, "internal") ? "outbound" : "internal");
        }
        if (sent == total && now > give_up) break;
        double next = sent < total ? t0 + sent / rate : now + 0.05;
        if (pend_head < pend_tail && pend[pend_head].due < next) next = pend[pend_head].due;
        double wait = next - now; if (wait < 0) wait = 0;
        struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
        int n = epoll_pwait2(ep, events, 256, &ts, NULL);
        for (int e = 0; e < n; e++) {
            struct call *k = events[e].data.ptr;
            if (k == NULL) {  /* the AMI's replies: read and dropped */
                while (read(ami_fd, line, sizeof line) > 0) {}
                continue;
            }
            if (k->done) continue;
            if (events[e].events & EPOLLOUT) {
                flush_out(k);
                if (k->out_len == 0) {
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = k};
                    epoll_ctl(ep, EPOLL_CTL_MOD, k->fd, &ce);
                }
            }
            if (!(events[e].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) continue;
            int eof = 0;
            for (;;) {
                ssize_t r = read(k->fd, k->in + k->in_len, sizeof k->in - 1 - k->in_len);
                if (r > 0) { k->in_len += (size_t)r; if (k->in_len >= sizeof k->in - 1) { eof = -1; break; } continue; }
                if (r == 0) { eof = 1; break; }
                if (errno == EAGAIN) break;
                eof = -1; break;
            }
            /* whole lines: answer each command */
            char *start = k->in, *nl;
            while ((nl = memchr(start, '\n', k->in_len - (size_t)(start - k->in)))) {
                *nl = 0;
                if (nl > start && nl[-1] == '\r') nl[-1] = 0;
                if (!strncmp(start, "SET VARIABLE ", 13)) {
                    char *name = start + 13, *sp = strchr(name, ' ');
                    if (sp) { *sp = 0; set_variable(k, name, sp + 1); }
                    queue_out(k, "200 result=1\n");
                } else {
                    queue_out(k, "510 Invalid or unknown command\n");
                }
                start = nl + 1;
            }
            size_t left = k->in_len - (size_t)(start - k->in);
            memmove(k->in, start, left); k->in_len = left;
            flush_out(k);
            if (!eof) continue;
            /* the agent ended its side: the decision is in */
            double took = mono() - k->t0;
            epoll_ctl(ep, EPOLL_CTL_DEL, k->fd, NULL);
            close(k->fd); k->fd = -1; k->done = 1; finished++;
            latency[k->index] = took;
            const struct caller *c = &callers[k->index % n_callers];
            if (eof < 0) {
                snprintf(k->decision, sizeof k->decision, "error:read");
            } else if (!strcmp(k->decision, "admit") && k->call_id[0]) {
                char msg[256];
                snprintf(msg, sizeof msg, "Action: UserEvent\r\nUserEvent: PbxAnswered\r\n"
                         "PbxCall: %s\r\nPbxChannel: PJSIP/carrier-%s-%08x\r\n\r\n",
                         k->call_id, carrier, (unsigned)k->index);
                ami_write(msg);
                struct pending *p = &pend[pend_tail++];
                p->due = mono() + hold; p->start_wall = k->start_wall;
                p->answered_wall = wall(); p->index = k->index;
                snprintf(p->call_id, sizeof p->call_id, "%s", k->call_id);
            } else {
                char uniqueid[96]; uniqueid_of(k->index, uniqueid, sizeof uniqueid);
                const char *why = k->reason[0] ? k->reason : (k->decision[0] ? k->decision : "no decision");
                cdr_line(uniqueid, "", k->start_wall, 0, wall(), "FAILED", c, why, k->sip_code,
                         c->direction);
            }
        }
    }
    for (int i = 0; i < total; i++) {
        struct call *k = calls[i];
        if (!k) { printf("call %d 0 0 error:unsent 0 -\n", i); continue; }
        const char *decision = k->decision[0] ? k->decision : (k->done ? "none" : "error:timeout");
        printf("call %d %.0f %.0f %s %s %s\n", i, latency[i] * 1e6, k->late * 1e6, decision,
               k->sip_code[0] ? k->sip_code : "0", k->reason[0] ? k->reason : "-");
    }
    printf("done\n");
    return 0;
}
