/*
 * Godwit test guest: the ring-3 workload (and the ring-0 exception report).
 *
 * Freestanding, integer-only C (-mgeneral-regs-only): safe to run at CPL0
 * under an emulator without SSE; r15 is reserved (-ffixed-r15) and xmm15 is
 * never touched by the compiler, so both hold state only this file changes.
 * The parameters and the output lines are documented in src/lib.rs.
 */

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long usize;

#define COM1            0x3f8
#define COM1_LSR        (COM1 + 5)
#define LSR_THRE        0x20
#define DEBUG_EXIT      0xf4

#define REGION_START    (16ul << 20)
#define MAP_END         (4ul << 30)        /* boot.S maps 0..4 GiB */
#define PAGE            4096ul
#define MAX_ERR_LINES   16
#define DEFAULT_TSC_KHZ 2000000ul

#define START_MAGIC     0x336ec578u
#define E820_RAM        1

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

/* Register-only state: value after n heartbeats is BASE + n * STEP. */
#define R15_BASE        0x6a09e667f3bcc908ul
#define R15_STEP        0x9e3779b97f4a7c15ul
#define X_LO_BASE       0xbb67ae8584caa73bul
#define X_LO_STEP       0x3c6ef372fe94f82bul
#define X_HI_BASE       0xa54ff53a5f1d36f1ul
#define X_HI_STEP       0x510e527fade682d1ul

static const u64 xmm_init[2] __attribute__((aligned(16))) = { X_LO_BASE, X_HI_BASE };
static const u64 xmm_step[2] __attribute__((aligned(16))) = { X_LO_STEP, X_HI_STEP };

/* Dirty-mode page pattern. */
#define PAT_STEP        0x9e3779b97f4a7c15ul

/* ------------------------------------------------------------------ */
/* libc bits GCC may emit calls to. */

void *memset(void *d, int c, usize n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, usize n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

/* ------------------------------------------------------------------ */

static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

static inline u64 r15_get(void)
{
    u64 v;
    __asm__ volatile("mov %%r15, %0" : "=r"(v));
    return v;
}

static inline void r15_set(u64 v)
{
    __asm__ volatile("mov %0, %%r15" : : "r"(v));
}

static inline void r15_add(u64 v)
{
    __asm__ volatile("add %0, %%r15" : : "r"(v));
}

static inline void xmm15_load(const u64 v[2])
{
    __asm__ volatile("movdqu %0, %%xmm15" : : "m"(*(const u64(*)[2])v));
}

static inline void xmm15_store(u64 v[2])
{
    __asm__ volatile("movdqu %%xmm15, %0" : "=m"(*(u64(*)[2])v));
}

static inline void xmm15_add_step(void)
{
    __asm__ volatile("paddq %0, %%xmm15" : : "m"(xmm_step));
}

/* ------------------------------------------------------------------ */
/* Global state (in .bss, zeroed by boot.S). */

enum { MODE_CHECK, MODE_DIRTY };

static struct {
    /* parameters */
    int mode;
    u64 wss_mb;
    int wss_given;
    u64 rate_mbps;
    int no_catchup;
    int fill;
    u64 hb_ms;
    u64 tsc_khz;
    const char *tsc_src;
    u64 passes;
    u64 start, end;

    /* timing */
    u64 last_tsc;
    u64 max_gap;
    u64 hb_ticks;
    u64 next_hb;
    u64 back_events;        /* tsc backwards, not yet reported */
    u64 back_prev, back_now;

    /* pacing */
    u64 next_page;
    u64 tpp_int, tpp_frac, frac_acc;

    /* progress */
    u64 seq;
    u64 pass;
    u64 errors;
    u32 page_err_lines;
    u32 misc_err_lines;
    int lsr_dead;
} g;

/* ------------------------------------------------------------------ */
/* Output: build a line, then emit it with one LSR poll. */

struct line {
    u32 len;
    char buf[200];
};

static void put_c(struct line *l, char c)
{
    if (l->len < sizeof(l->buf) - 1)
        l->buf[l->len++] = c;
}

static void put_s(struct line *l, const char *s)
{
    while (*s)
        put_c(l, *s++);
}

static void put_dec(struct line *l, u64 v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        put_c(l, tmp[--n]);
}

static void put_hex_digits(struct line *l, u64 v, int min_digits)
{
    static const char hex[] = "0123456789abcdef";
    int shift = 60;
    int started = 0;
    for (; shift >= 0; shift -= 4) {
        u32 d = (v >> shift) & 0xf;
        if (d || started || shift < min_digits * 4) {
            put_c(l, hex[d]);
            started = 1;
        }
    }
}

static void put_hex(struct line *l, u64 v)
{
    put_s(l, "0x");
    put_hex_digits(l, v, 1);
}

static void tick(void);

/* Write a line to COM1; `track` keeps the stall tracker running per char. */
static void serial_line(struct line *l, int track)
{
    u32 i;
    if (l->len < sizeof(l->buf))
        l->buf[l->len++] = '\n';
    if (!g.lsr_dead) {
        int tries = 1000;
        while (!(inb(COM1_LSR) & LSR_THRE) && --tries)
            ;
        if (!tries)
            g.lsr_dead = 1;     /* LSR never reports empty: stop polling */
    }
    for (i = 0; i < l->len; i++) {
        outb(COM1, (u8)l->buf[i]);
        if (track)
            tick();
    }
    l->len = 0;
}

static void emit(struct line *l)
{
    serial_line(l, 1);
}

static __attribute__((noreturn)) void finish(u8 code)
{
    outb(DEBUG_EXIT, code);
    for (;;)
        cpu_relax();
}

/* Ring 0, called from boot.S for any of the 32 exception vectors. */
void exc_report(u64 vec, u64 err, u64 rip, u64 cr2)
{
    struct line l;
    l.len = 0;
    put_s(&l, "EXC ");
    put_dec(&l, vec);
    put_s(&l, " rip=");
    put_hex(&l, rip);
    put_s(&l, " err=");
    put_hex(&l, err);
    put_s(&l, " cr2=");
    put_hex(&l, cr2);
    g.lsr_dead = 0;
    serial_line(&l, 0);
}

/* ------------------------------------------------------------------ */
/* Errors. */

static int page_err_line(void)
{
    g.errors++;
    if (g.page_err_lines >= MAX_ERR_LINES)
        return 0;
    g.page_err_lines++;
    return 1;
}

static int misc_err_line(void)
{
    g.errors++;
    if (g.misc_err_lines >= MAX_ERR_LINES)
        return 0;
    g.misc_err_lines++;
    return 1;
}

/* ------------------------------------------------------------------ */
/* Time keeping. */

/* Take a TSC reading: track the largest gap, note backwards steps. */
static void tick(void)
{
    u64 t = rdtsc();
    if (t < g.last_tsc) {
        if (!g.back_events)
            g.back_prev = g.last_tsc, g.back_now = t;
        g.back_events++;
    } else if (t - g.last_tsc > g.max_gap) {
        g.max_gap = t - g.last_tsc;
    }
    g.last_tsc = t;
}

static void report_backwards(void)
{
    struct line l;
    u64 n = g.back_events;
    g.back_events = 0;
    l.len = 0;
    put_s(&l, "ERR tsc backwards prev=");
    put_hex(&l, g.back_prev);
    put_s(&l, " now=");
    put_hex(&l, g.back_now);
    /* Every event counts as an error; one line per batch. */
    g.errors += n - 1;
    if (misc_err_line())
        emit(&l);
}

static void check_regs(void)
{
    struct line l;
    u64 n = g.seq;     /* heartbeats completed so far */
    u64 want = R15_BASE + n * R15_STEP;
    u64 got = r15_get();
    u64 x[2] __attribute__((aligned(16)));
    u64 xw[2];

    l.len = 0;
    if (got != want) {
        put_s(&l, "ERR regs r15=");
        put_hex(&l, got);
        put_s(&l, " want=");
        put_hex(&l, want);
        if (misc_err_line())
            emit(&l);
        l.len = 0;
        r15_set(want);
    }

    xw[0] = X_LO_BASE + n * X_LO_STEP;
    xw[1] = X_HI_BASE + n * X_HI_STEP;
    xmm15_store(x);
    if (x[0] != xw[0] || x[1] != xw[1]) {
        put_s(&l, "ERR regs xmm15=0x");
        put_hex_digits(&l, x[1], 16);
        put_hex_digits(&l, x[0], 16);
        put_s(&l, " want=0x");
        put_hex_digits(&l, xw[1], 16);
        put_hex_digits(&l, xw[0], 16);
        if (misc_err_line())
            emit(&l);
        l.len = 0;
        xmm15_load(xw);
    }

    r15_add(R15_STEP);
    xmm15_add_step();
}

static void heartbeat(void)
{
    struct line l;
    u64 stall_us = g.max_gap * 1000 / g.tsc_khz;

    /* Everything from here on belongs to the next period. */
    g.max_gap = 0;
    check_regs();
    g.seq++;

    l.len = 0;
    put_s(&l, "hb seq=");
    put_dec(&l, g.seq);
    put_s(&l, " pass=");
    put_dec(&l, g.pass);
    put_s(&l, " stall_us=");
    put_dec(&l, stall_us);
    if (g.errors) {
        put_s(&l, " err=");
        put_dec(&l, g.errors);
    } else {
        put_s(&l, " ok");
    }
    emit(&l);

    g.next_hb += g.hb_ticks;
    if (g.next_hb <= g.last_tsc)
        g.next_hb = g.last_tsc + g.hb_ticks;
}

/* Read the TSC, report pending TSC errors, send a heartbeat when due. */
static u64 poll(void)
{
    tick();
    if (g.back_events)
        report_backwards();
    if (g.last_tsc >= g.next_hb)
        heartbeat();
    return g.last_tsc;
}

/* Wait for the next page slot when rate_mbps > 0. */
static void pace(void)
{
    u64 t = poll();
    while (t < g.next_page) {
        cpu_relax();
        t = poll();
    }
    g.next_page += g.tpp_int;
    g.frac_acc += g.tpp_frac;
    if (g.frac_acc >> 16) {
        g.next_page += g.frac_acc >> 16;
        g.frac_acc &= 0xffff;
    }
    /* After a stall, catch up for at most one heartbeat period (a workload with a backlog,
       like a network receiver), or with catchup=0 not at all (a workload that dirties memory
       as it computes: a stall is lost work, so throttling its vCPU slows it down). */
    if (g.next_page + (g.no_catchup ? 0 : g.hb_ticks) < t)
        g.next_page = t;
}

/* ------------------------------------------------------------------ */
/* The memory check. */

static inline u64 mix64(u64 x)
{
    x += 0x9e3779b97f4a7c15ul;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ul;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebul;
    return x ^ (x >> 31);
}

/* Word i (1..511) of page p after pass r is pat_base(p, r) + i * PAT_STEP. */
static inline u64 pat_base(u64 p, u64 r)
{
    return mix64((p << 24) ^ r);
}

static inline u64 pat_last(u64 p, u64 r)
{
    return r ? pat_base(p, r) + 511 * PAT_STEP : 0;
}

static void lost_page(u64 gpa, u64 got, u64 want)
{
    struct line l;
    if (!page_err_line())
        return;
    l.len = 0;
    put_s(&l, "ERR lost page gpa=");
    put_hex(&l, gpa);
    put_s(&l, " got=");
    put_dec(&l, got);
    put_s(&l, " want=");
    put_dec(&l, want);
    put_s(&l, " pass=");
    put_dec(&l, g.pass);
    emit(&l);
}

static void torn_page(u64 gpa, u64 got, u64 want)
{
    struct line l;
    if (!page_err_line())
        return;
    l.len = 0;
    put_s(&l, "ERR torn page gpa=");
    put_hex(&l, gpa);
    put_s(&l, " got=");
    put_hex(&l, got);
    put_s(&l, " want=");
    put_hex(&l, want);
    put_s(&l, " pass=");
    put_dec(&l, g.pass);
    emit(&l);
}

static void run_pass(u64 r)
{
    u64 npages = (g.end - g.start) / PAGE;
    u8 want = (u8)(r - 1);
    int paced = g.rate_mbps && !(g.fill && r == 1);
    u64 p;

    /* After an unpaced fill pass, the rate starts counting now. */
    if (paced && g.fill && r == 2)
        g.next_page = poll();

    for (p = 0; p < npages; p++) {
        u64 gpa = g.start + p * PAGE;
        volatile u8 *b = (volatile u8 *)gpa;
        u8 got;

        if (paced)
            pace();
        else if ((p & 15) == 0)
            poll();

        got = *b;
        if (got != want)
            lost_page(gpa, got, want);

        if (g.mode == MODE_DIRTY) {
            u64 *w = (u64 *)gpa;
            u64 last = ((volatile u64 *)w)[511];
            u64 lw = pat_last(p, r - 1);
            u64 v;
            u32 i;
            if (last != lw)
                torn_page(gpa, last, lw);
            w[0] = r & 0xff;
            v = pat_base(p, r);
            for (i = 1; i < 512; i++) {
                v += PAT_STEP;
                w[i] = v;
            }
        } else {
            *b = (u8)r;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Setup. */

static int streq_n(const char *a, const char *b, usize n)
{
    usize i;
    for (i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return b[n] == 0;
}

static u64 parse_u64(const char *s, usize n)
{
    u64 v = 0;
    usize i;
    for (i = 0; i < n && s[i] >= '0' && s[i] <= '9'; i++)
        v = v * 10 + (u64)(s[i] - '0');
    return v;
}

static void parse_cmdline(const char *c)
{
    while (*c) {
        const char *key, *val;
        usize klen = 0, vlen = 0;
        while (*c == ' ' || *c == '\t' || *c == '\n')
            c++;
        key = c;
        while (*c && *c != '=' && *c != ' ' && *c != '\t' && *c != '\n')
            c++, klen++;
        if (*c != '=')
            continue;           /* bare word: ignore */
        val = ++c;
        while (*c && *c != ' ' && *c != '\t' && *c != '\n')
            c++, vlen++;

        if (streq_n(key, "mode", klen)) {
            if (streq_n(val, "dirty", vlen))
                g.mode = MODE_DIRTY;
            else
                g.mode = MODE_CHECK;
        } else if (streq_n(key, "wss_mb", klen)) {
            g.wss_mb = parse_u64(val, vlen);
            g.wss_given = 1;
        } else if (streq_n(key, "rate_mbps", klen)) {
            g.rate_mbps = parse_u64(val, vlen);
        } else if (streq_n(key, "catchup", klen)) {
            g.no_catchup = parse_u64(val, vlen) == 0;
        } else if (streq_n(key, "fill", klen)) {
            g.fill = parse_u64(val, vlen) != 0;
        } else if (streq_n(key, "hb_ms", klen)) {
            g.hb_ms = parse_u64(val, vlen);
        } else if (streq_n(key, "tsc_khz", klen)) {
            g.tsc_khz = parse_u64(val, vlen);
            g.tsc_src = "cmdline";
        } else if (streq_n(key, "passes", klen)) {
            g.passes = parse_u64(val, vlen);
        }
    }
}

static void fail(const char *msg, u64 v)
{
    struct line l;
    l.len = 0;
    put_s(&l, "ERR ");
    put_s(&l, msg);
    put_hex(&l, v);
    emit(&l);
    finish(1);
}

static void find_region(const struct hvm_start_info *si)
{
    u64 end = 0;

    if (si->version >= 1 && si->memmap_paddr && si->memmap_entries) {
        const struct hvm_memmap_entry *m =
            (const struct hvm_memmap_entry *)si->memmap_paddr;
        u32 i;
        for (i = 0; i < si->memmap_entries; i++) {
            u64 a = m[i].addr, e = m[i].addr + m[i].size;
            if (m[i].type != E820_RAM || e <= REGION_START)
                continue;
            if (a > REGION_START)
                break;          /* first RAM above 1 MiB starts after 16 MiB */
            end = e;
            break;
        }
        if (!end)
            fail("no RAM region covering 16 MiB in memmap, entries=", si->memmap_entries);
        if (end > MAP_END)
            end = MAP_END;
        if (g.wss_given && g.wss_mb && REGION_START + (g.wss_mb << 20) < end)
            end = REGION_START + (g.wss_mb << 20);
    } else if (g.wss_given && g.wss_mb) {
        end = REGION_START + (g.wss_mb << 20);   /* no memmap: trust wss_mb */
        if (end > MAP_END)
            end = MAP_END;
    } else {
        fail("no memmap and no wss_mb, start_info version=", si->version);
    }
    end &= ~(PAGE - 1);
    if (end <= REGION_START)
        fail("no RAM above 16 MiB, end=", end);
    g.start = REGION_START;
    g.end = end;
    g.wss_mb = (g.end - g.start) >> 20;
}

/* cpuid_khz: CPUID 0x40000010 EAX as read by boot.S at CPL0, or 0. */
static void find_tsc_khz(u64 cpuid_khz)
{
    if (g.tsc_khz)
        return;
    if (cpuid_khz) {
        g.tsc_khz = cpuid_khz;
        g.tsc_src = "cpuid";
        return;
    }
    g.tsc_khz = DEFAULT_TSC_KHZ;
    g.tsc_src = "assumed";
}

void user_main(const struct hvm_start_info *si, u64 cpuid_khz)
{
    struct line l;
    u64 r;

    r15_set(R15_BASE);
    xmm15_load(xmm_init);
    g.hb_ms = 50;

    if (!si || si->magic != START_MAGIC)
        fail("bad hvm_start_info magic=", si ? si->magic : 0);
    if (si->cmdline_paddr)
        parse_cmdline((const char *)si->cmdline_paddr);
    if (!g.hb_ms)
        g.hb_ms = 1;
    find_tsc_khz(cpuid_khz);
    find_region(si);

    g.hb_ticks = g.hb_ms * g.tsc_khz;
    if (g.rate_mbps) {
        u64 tpp16 = ((g.tsc_khz * 1000) << 16) / (g.rate_mbps * 256);
        g.tpp_int = tpp16 >> 16;
        g.tpp_frac = tpp16 & 0xffff;
    }

    l.len = 0;
    put_s(&l, "godwit-guest boot mode=");
    put_s(&l, g.mode == MODE_DIRTY ? "dirty" : "check");
    put_s(&l, " wss_mb=");
    put_dec(&l, g.wss_mb);
    put_s(&l, " rate_mbps=");
    put_dec(&l, g.rate_mbps);
    put_s(&l, g.no_catchup ? " catchup=0" : "");
    put_s(&l, g.fill ? " fill=1" : "");
    put_s(&l, " hb_ms=");
    put_dec(&l, g.hb_ms);
    put_s(&l, " tsc_khz=");
    put_dec(&l, g.tsc_khz);
    put_s(&l, " region=");
    put_hex(&l, g.start);
    put_c(&l, '-');
    put_hex(&l, g.end);
    put_s(&l, " tsc_src=");
    put_s(&l, g.tsc_src);
    g.last_tsc = rdtsc();
    emit(&l);

    g.max_gap = 0;
    g.next_hb = g.last_tsc + g.hb_ticks;
    g.next_page = g.last_tsc;

    for (r = 1; !g.passes || r <= g.passes; r++) {
        g.pass = r;
        run_pass(r);
    }

    poll();
    l.len = 0;
    put_s(&l, "done passes=");
    put_dec(&l, g.passes);
    put_s(&l, " errors=");
    put_dec(&l, g.errors);
    emit(&l);
    finish(g.errors ? 1 : 0);
}
