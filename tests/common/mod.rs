//! The end-to-end harness: a two-host lab, `godwit` processes on each host, and the guest's
//! serial logs. The lab is one of two wires:
//!
//! - on a plain host, two network namespaces joined by a veth pair (made by `ci/lab.sh`),
//!   with TCP between them;
//! - inside the soft-RoCE lab VM (`ci/rdmalab`, which sets `GODWIT_RXE_LAB=1` for the test),
//!   the VM's own veth pair with rxe0 on 10.99.0.1 and rxe1 on 10.99.0.2. soft-RoCE works
//!   only in the initial namespace, so both "hosts" share it, and every migration runs over
//!   RDMA. The lab VM runs under TCG, so there every wait is [`SLOWDOWN`] times longer.
//!
//! Every wait is bounded; every process a test starts is killed by PID when the test ends.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use godwit::heartbeat::{self, Summary};

/// The longest a migration may take in a test (before [`scaled`]).
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variable that says the test runs inside the soft-RoCE lab VM.
pub const RXE_LAB_VAR: &str = "GODWIT_RXE_LAB";

/// How much longer every wait is inside the soft-RoCE lab: its CPU is emulated (TCG), and
/// the nested guest's ring-0 code runs in two instruction emulators.
pub const SLOWDOWN: u32 = 4;

/// Whether the test runs inside the soft-RoCE lab VM.
pub fn in_rxe_lab() -> bool {
    std::env::var_os(RXE_LAB_VAR).is_some()
}

/// `d`, stretched inside the soft-RoCE lab.
pub fn scaled(d: Duration) -> Duration {
    if in_rxe_lab() {
        d * SLOWDOWN
    } else {
        d
    }
}

/// Waits until the receiver whose serial log is `serial` listens.
pub fn wait_listening(serial: &str) {
    wait_for(Duration::from_secs(10), "the receiver to listen", || {
        std::fs::read_to_string(format!("{serial}.stderr"))
            .is_ok_and(|s| s.contains("waiting for a VM"))
    });
}

/// Waits until the guest has checked all its memory `passes` more times.
pub fn wait_checked(logs: &[String], passes: u64) {
    let (start_pass, start_seq) = (last_pass(logs), guest(logs).last_seq);
    wait_for(
        Duration::from_secs(20),
        "the guest to check its memory again",
        || last_pass(logs) >= start_pass + passes && guest(logs).last_seq > start_seq,
    );
}

/// The end-to-end tests share two cores: one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// Whether this machine can run the end-to-end tests (root, KVM, `ip`).
pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok =
        root && Path::new("/dev/kvm").exists() && Command::new("ip").arg("-V").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: the end-to-end tests need root, /dev/kvm and iproute2");
    }
    ok
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `godwit` binary under test.
pub fn godwit() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_godwit"))
}

/// What joins the two hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Two network namespaces and TCP (`ci/lab.sh`).
    Namespaces,
    /// The soft-RoCE lab VM's veth pair and RDMA (see the module comment).
    Rxe,
}

/// Two hosts, `a` and `b`.
pub struct Lab {
    name: String,
    subnet: u8,
    pub wire: Wire,
    pub dir: PathBuf,
    /// Whether hosts authenticate with certificates ([`Lab::use_certificates`]) instead of
    /// the shared key.
    certificates: bool,
}

impl Lab {
    /// The lab named `name` (with its own `subnet`), or inside the soft-RoCE lab VM, the VM's
    /// wire.
    pub fn up(name: &str, subnet: u8) -> Lab {
        let wire = if in_rxe_lab() {
            Wire::Rxe
        } else {
            let st = Command::new("bash")
                .arg(repo().join("ci/lab.sh"))
                .args(["up", name])
                .env("LAB_SUBNET", subnet.to_string())
                .stdout(Stdio::null())
                .status()
                .expect("running ci/lab.sh");
            assert!(st.success(), "ci/lab.sh up {name} failed");
            Wire::Namespaces
        };
        let dir = std::env::temp_dir().join(format!("godwit-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lab = Lab {
            name: name.into(),
            subnet,
            wire,
            dir,
            certificates: false,
        };
        lab.new_key("key");
        lab
    }

    /// Writes a new pre-shared key to `file` in the lab's folder; returns its path.
    pub fn new_key(&self, file: &str) -> String {
        let path = self.path(file);
        let st = Command::new(godwit())
            .args(["key", "new", &path])
            .stdout(Stdio::null())
            .status()
            .expect("running godwit key new");
        assert!(st.success(), "godwit key new {path} failed");
        path
    }

    /// Host `h`'s end of the link.
    pub fn veth(&self, h: char) -> String {
        match self.wire {
            Wire::Namespaces => format!("{}-v{h}", self.name),
            Wire::Rxe => format!("veth{}", if h == 'a' { 0 } else { 1 }),
        }
    }

    /// A command that runs `program args` on host `h`.
    pub fn on_host(&self, h: char, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut c = match self.wire {
            Wire::Namespaces => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &format!("{}-{h}", self.name)])
                    .arg(program);
                c
            }
            Wire::Rxe => Command::new(program),
        };
        c.args(args);
        c
    }

    /// Takes host a's end of the link down (`up` false), or brings it back.
    pub fn set_link(&self, up: bool) {
        for cmd in self.link_commands(up) {
            run_ok(cmd);
        }
    }

    fn link_commands(&self, up: bool) -> Vec<Command> {
        let veth = self.veth('a');
        let mut cmds = vec![self.on_host(
            'a',
            "ip",
            &["link", "set", &veth, if up { "up" } else { "down" }],
        )];
        if up && self.wire == Wire::Rxe {
            // A link going down takes its routes along; restore the one that sends traffic
            // for the other end across the veth (ci/rdmalab/init) rather than through lo,
            // where rxe does not listen.
            let (to, from) = (self.addr('b'), self.addr('a'));
            cmds.push(self.on_host(
                'a',
                "ip",
                &[
                    "route", "replace", &to, "dev", &veth, "src", &from, "table", "100",
                ],
            ));
        }
        cmds
    }

    /// Drops every packet host a's end of the link sends or receives (`on`), or stops
    /// dropping: a firewall rule (nftables), since netem is not in every kernel.
    pub fn set_stall(&self, on: bool) {
        let veth = self.veth('a');
        let script = if on {
            format!(
                "table inet godwit_stall {{
                   chain in {{ type filter hook input priority 0; iifname \"{veth}\" drop; }}
                   chain out {{ type filter hook output priority 0; oifname \"{veth}\" drop; }}
                 }}"
            )
        } else {
            "delete table inet godwit_stall".to_string()
        };
        let path = self.path("stall.nft");
        std::fs::write(&path, script).unwrap();
        run_ok(self.on_host('a', "nft", &["-f", &path]));
    }

    /// Mends the soft-RoCE lab's wire after a test that failed with it cut or stalled: it
    /// outlives the test, unlike a pair of namespaces.
    pub fn mend_wire(&self) {
        let unstall = self.on_host('a', "nft", &["delete", "table", "inet", "godwit_stall"]);
        for mut cmd in std::iter::once(unstall).chain(self.link_commands(true)) {
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }

    /// From now on both hosts authenticate with certificates from one new CA, each naming
    /// its host's address.
    pub fn use_certificates(&mut self) {
        let ca = self.path("ca");
        let run = |args: &[&str]| {
            let st = Command::new(godwit())
                .args(args)
                .stdout(Stdio::null())
                .status()
                .expect("running godwit ca");
            assert!(st.success(), "godwit {args:?} failed");
        };
        run(&["ca", "new", &ca]);
        for h in ['a', 'b'] {
            let out = self.path(&format!("host-{h}"));
            run(&[
                "ca",
                "issue",
                "--ca-dir",
                &ca,
                "--ip",
                &self.addr(h),
                "--out",
                &out,
            ]);
        }
        self.certificates = true;
    }

    /// How host `h` authenticates, as command-line arguments.
    pub fn auth_args(&self, h: char) -> Vec<String> {
        if self.certificates {
            let host = self.path(&format!("host-{h}"));
            vec![
                "--cert".into(),
                format!("{host}.pem"),
                "--cert-key".into(),
                format!("{host}.key"),
                "--ca".into(),
                self.path("ca/ca.pem"),
            ]
        } else {
            vec!["--key".into(), self.key()]
        }
    }

    /// The key both hosts share.
    pub fn key(&self) -> String {
        self.path("key")
    }

    /// Boots a test guest on host a as VM process `n` with extra environment `env`; returns
    /// its process (API ready) and serial log.
    pub fn boot(
        &self,
        n: usize,
        guest: &str,
        memory: &str,
        cmdline: &str,
        env: &[(&str, &str)],
    ) -> (VmProcess, String) {
        let serial = self.path(&format!("serial-{n}.log"));
        let api = self.path(&format!("vm-{n}.sock"));
        let mut cmd = self.godwit(
            'a',
            &[
                "run",
                "--guest",
                guest,
                "--memory",
                memory,
                "--cmdline",
                cmdline,
                "--api",
                &api,
                "--serial",
                &serial,
            ],
        );
        cmd.envs(env.iter().copied());
        let mut vm = VmProcess::spawn(cmd, api, 'a', &serial);
        vm.wait_api();
        (vm, serial)
    }

    /// The usual start of a test: `guest` booted on host a as VM process 0 and a receiver on
    /// host b as process 1 (migration `m1`), once the guest has checked its memory `passes`
    /// times and the receiver listens; returns both and their serial logs.
    pub fn pair(
        &self,
        guest: &str,
        memory: &str,
        cmdline: &str,
        passes: u64,
    ) -> (VmProcess, VmProcess, Vec<String>) {
        let (source, serial0) = self.boot(0, guest, memory, cmdline, &[]);
        let (dest, serial1) = self.receiver('b', 1, &[], &[]);
        let logs = vec![serial0, serial1];
        wait_checked(&logs, passes);
        wait_listening(&logs[1]);
        (source, dest, logs)
    }

    /// Starts `godwit receive` as VM process `n` on host `h`, listening on port 7000 of its
    /// address for migration `m{n}`, with `extra` arguments and environment `env`.
    pub fn receiver(
        &self,
        h: char,
        n: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (VmProcess, String) {
        let api = self.path(&format!("vm-{n}.sock"));
        let serial = self.path(&format!("serial-{n}.log"));
        let listen = format!("{}:7000", self.addr(h));
        let (auth, id) = (self.auth_args(h), format!("m{n}"));
        let mut args = vec![
            "receive",
            "--listen",
            &listen,
            "--api",
            &api,
            "--serial",
            &serial,
            "--accept-timeout",
            "60s",
            "--id",
            &id,
        ];
        args.extend(auth.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let mut cmd = self.godwit(h, &args);
        cmd.envs(env.iter().copied());
        (VmProcess::spawn(cmd, api, h, &serial), serial)
    }

    /// Asks the VM behind `from` to move to receiver `n` on host `to` at port 7000; returns
    /// the JSON report.
    pub fn send(&self, from: &VmProcess, to: char, n: usize, extra: &[&str]) -> serde_json::Value {
        let out = run_bounded(self.send_command(from, to, n, extra), MOVE_TIMEOUT);
        report(&out)
    }

    /// The `godwit send` command of [`Lab::send`].
    pub fn send_command(&self, from: &VmProcess, to: char, n: usize, extra: &[&str]) -> Command {
        self.send_command_with(from, to, n, &self.auth_args(from.host), extra)
    }

    /// The same with other authentication arguments.
    pub fn send_command_with(
        &self,
        from: &VmProcess,
        to: char,
        n: usize,
        auth: &[String],
        extra: &[&str],
    ) -> Command {
        self.move_command("send", from, to, n, auth, extra)
    }

    /// `godwit forecast` for the move [`Lab::send`] would make; returns the JSON forecast.
    pub fn forecast(
        &self,
        from: &VmProcess,
        to: char,
        n: usize,
        extra: &[&str],
    ) -> serde_json::Value {
        let cmd = self.move_command("forecast", from, to, n, &self.auth_args(from.host), extra);
        report(&run_bounded(cmd, MOVE_TIMEOUT))
    }

    fn move_command(
        &self,
        sub: &str,
        from: &VmProcess,
        to: char,
        n: usize,
        auth: &[String],
        extra: &[&str],
    ) -> Command {
        let dest = format!("{}:7000", self.addr(to));
        let id = format!("m{n}");
        let mut args = vec![
            sub, "--api", &from.api, "--to", &dest, "--json", "--id", &id,
        ];
        if self.wire == Wire::Rxe {
            args.extend(["--transport", "rdma"]);
        }
        args.extend(auth.iter().map(String::as_str));
        args.extend_from_slice(extra);
        self.godwit(from.host, &args)
    }

    /// The address of host `h` ('a' or 'b').
    pub fn addr(&self, h: char) -> String {
        let host = if h == 'a' { 1 } else { 2 };
        match self.wire {
            Wire::Namespaces => format!("10.77.{}.{host}", self.subnet),
            Wire::Rxe => format!("10.99.0.{host}"),
        }
    }

    /// A command that runs `godwit args` on host `h`.
    pub fn godwit(&self, h: char, args: &[&str]) -> Command {
        self.on_host(h, godwit(), args)
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        match self.wire {
            Wire::Namespaces => {
                let _ = Command::new("bash")
                    .arg(repo().join("ci/lab.sh"))
                    .args(["down", &self.name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            Wire::Rxe => self.mend_wire(),
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            // The last words of every log, for a CI run (or a lab VM) that keeps no files.
            let mut logs: Vec<_> = std::fs::read_dir(&self.dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log" || x == "stderr"))
                .collect();
            logs.sort();
            for p in logs {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- {}", p.display());
                for l in &lines[lines.len().saturating_sub(8)..] {
                    eprintln!("{l}");
                }
            }
            if self.wire == Wire::Rxe {
                // The lab kernel's last words too: a lockup or an rxe error shows there.
                if let Ok(out) = Command::new("dmesg").output() {
                    let text = String::from_utf8_lossy(&out.stdout);
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!("--- dmesg");
                    for l in &lines[lines.len().saturating_sub(15)..] {
                        eprintln!("{l}");
                    }
                }
            }
            eprintln!("logs kept in {}", self.dir.display());
        }
    }
}

/// A `godwit run` or `godwit receive` process hosting (or about to host) the VM.
pub struct VmProcess {
    pub child: Child,
    pub api: String,
    pub host: char,
}

impl VmProcess {
    pub fn spawn(mut cmd: Command, api: String, host: char, log: &str) -> VmProcess {
        let err = std::fs::File::create(format!("{log}.stderr")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("starting godwit");
        VmProcess { child, api, host }
    }

    /// Waits for the API socket to appear.
    pub fn wait_api(&mut self) {
        wait_for(Duration::from_secs(10), "the API socket", || {
            Path::new(&self.api).exists()
        });
    }

    /// Waits up to `timeout` for the process to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + scaled(timeout);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// After a completed move: exactly one copy, on the destination. The source released the VM
/// and exited cleanly, the destination serves it, and the guest, having checked its memory
/// once more there, reports one uninterrupted life.
pub fn assert_moved(source: &mut VmProcess, dest: &mut VmProcess, logs: &[String]) {
    let st = source.wait_exit(Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "the source did not release the VM: {st:?}"
    );
    assert!(dest.is_running(), "the destination is not running");
    dest.wait_api();
    wait_checked(logs, 1);
    let s = guest(logs);
    assert!(s.healthy() && s.boots == 1, "the guest reports {s:?}");
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes (then panics naming `what`).
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a short command that must succeed.
fn run_ok(cmd: Command) {
    let out = run_bounded(cmd, Duration::from_secs(10));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command to completion with a time limit.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting a command");
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "command timed out after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's health from all its serial logs so far.
pub fn guest(logs: &[String]) -> Summary {
    let texts: Vec<String> = logs
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    heartbeat::analyse(&refs)
}

/// The guest's last reported memory-check pass.
pub fn last_pass(logs: &[String]) -> u64 {
    logs.iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let (_, rest) = l.split_once("] hb ")?;
                    let t: f64 = l[1..l.find(']')?].parse().ok()?;
                    let pass = rest
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("pass="))?
                        .parse::<u64>()
                        .ok()?;
                    Some((t, pass))
                })
                .collect::<Vec<_>>()
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, p)| p)
        .unwrap_or(0)
}

/// The JSON report `godwit send --json` printed.
pub fn report(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stdout: {text}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
