//! Subcommands of `godwit`.

mod render;
mod units;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use godwit::agent::{self, AgentExit};
use godwit::api::{AuthFiles, Client, Event, MigrateRequest, Request};
use godwit::heartbeat;
use godwit::migration::dataplane::TransportMode;
use godwit::migration::destination::{self, ReceiveOptions};
use godwit::migration::policy::CompressMode;
use godwit::migration::report::Outcome;
use godwit::migration::MigrationError;
use godwit::vmm::devices::SerialSink;
use godwit::vmm::memory::MemoryLayout;
use godwit::vmm::{Vm, VmConfig};
use godwit_transport::secure::{self, AuthOptions, Credentials, Psk};
use godwit_transport::{probe, TcpListener, TcpTransport, Transport, TransportListener};

/// How long a link test may run: the receiver gives up on a sender that outlasts it.
const LINKTEST_LIMIT: Duration = Duration::from_secs(300);

/// Godwit moves running KVM virtual machines between hosts.
#[derive(Parser, Debug)]
#[command(name = "godwit", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The built-in test guests.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Guest {
    /// Increments a byte in every page and checks the previous value: finds lost pages.
    Memcheck,
    /// Rewrites whole pages at a set rate (`--cmdline rate_mbps=N`), checking them too.
    Dirtier,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM and serve it until it exits, is stopped, or migrates away.
    Run {
        /// A built-in test guest.
        #[arg(long, conflicts_with = "kernel")]
        guest: Option<Guest>,
        /// A PVH ELF image to boot instead.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Command line passed to the guest (for the test guests: wss_mb=, rate_mbps=, hb_ms=, passes=).
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Guest RAM, e.g. 256M or 1G.
        #[arg(long, default_value = "256M", value_parser = units::parse_size)]
        memory: u64,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        cpus: u8,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Wait for a VM to arrive from another host, then serve it.
    Receive {
        /// Address to listen on, HOST:PORT.
        #[arg(long)]
        listen: String,
        /// How long to wait for a source.
        #[arg(long, default_value = "120s", value_parser = units::parse_duration)]
        accept_timeout: Duration,
        /// The most guest RAM to take, e.g. 16G (memory this host keeps for other VMs is not
        /// offered); by default whatever the host has available.
        #[arg(long, value_parser = units::parse_size)]
        max_memory: Option<u64>,
        /// How long the source may stay silent before the incoming migration is abandoned.
        #[arg(long, default_value = "60s", value_parser = units::parse_duration)]
        idle_timeout: Duration,
        /// The migration to accept (letters, digits, `.`, `_`, `-`); a random one is made
        /// and printed when none is given. The source must name it with `send --id`.
        #[arg(long, value_parser = parse_migration_id)]
        id: Option<String>,
        #[command(flatten)]
        auth: AuthArgs,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Move a running VM to a host where `godwit receive` waits.
    Send {
        #[command(flatten)]
        to: MoveArgs,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Say what moving a VM would take, before anything moves: samples the guest's dirty
    /// rate, measures the link to the waiting `godwit receive` (which goes on waiting), and
    /// predicts total time, downtime and whether pre-copy alone converges.
    Forecast {
        #[command(flatten)]
        to: MoveArgs,
        /// How long to watch the guest's writes.
        #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
        sample: Duration,
        /// Print the forecast as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's state.
    Status {
        /// The VM's API socket.
        #[arg(long)]
        api: PathBuf,
    },
    /// Cancel a VM's migration in progress; the VM keeps running where it is.
    Cancel {
        /// The VM's API socket.
        #[arg(long)]
        api: PathBuf,
    },
    /// Run again a VM that a migration left paused in doubt, once `godwit status` on the
    /// destination shows that it does not run there.
    Resume {
        /// The VM's API socket.
        #[arg(long)]
        api: PathBuf,
    },
    /// Stop a VM.
    Stop {
        /// The VM's API socket.
        #[arg(long)]
        api: PathBuf,
    },
    /// Read test guests' serial logs (from every host the guest ran on) and report
    /// reboots, counter breaks, guest-detected errors and the longest heartbeat gap.
    Heartbeat {
        /// Serial logs.
        logs: Vec<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure the raw bandwidth of N streams between two hosts (the baseline a migration is
    /// compared with): run `--listen` on one host and `--to` on the other.
    Linktest {
        /// Receive: address to listen on, HOST:PORT.
        #[arg(long, conflicts_with = "to")]
        listen: Option<String>,
        /// Send: the listening host, HOST:PORT.
        #[arg(long)]
        to: Option<String>,
        /// Parallel data streams.
        #[arg(long, default_value_t = 2)]
        streams: usize,
        /// How long to send.
        #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
        duration: Duration,
        /// Authenticate and encrypt the streams as a migration would (what encryption costs):
        /// the pre-shared key file, the same on both hosts.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the built-in test guest's ELF image to a file (to boot it under QEMU).
    ExportGuest {
        /// Where to write it.
        out: PathBuf,
    },
    /// Create a pre-shared key file for `send` and `receive --key` (copy it to both hosts).
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Certificates instead of a shared key: an operator CA, and a certificate per host.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
}

/// What to do with the CA.
#[derive(Subcommand, Debug)]
enum CaAction {
    /// Make a CA in DIR: ca.pem (give it to every host as --ca) and ca.key (keep it safe).
    New {
        /// A new or empty folder.
        dir: PathBuf,
    },
    /// Issue a certificate for one host, signed by the CA in --ca-dir: OUT.pem (--cert) and
    /// OUT.key (--cert-key). Name every address other hosts use to reach it.
    Issue {
        /// The folder `ca new` made.
        #[arg(long)]
        ca_dir: PathBuf,
        /// An IP address of the host (repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// A DNS name of the host (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// Where to write: OUT.pem and OUT.key.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Writes a new file; a secret one gets mode 600. Never overwrites.
fn write_new(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// What to do with keys.
#[derive(Subcommand, Debug)]
enum KeyAction {
    /// Write a new random key to FILE (mode 600; an existing file is never overwritten).
    New {
        /// The key file.
        file: PathBuf,
    },
}

/// How hosts authenticate each other: a shared key, or certificates from one CA.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = true)]
struct AuthArgs {
    /// The pre-shared key file (`godwit key new`), the same on both hosts.
    #[arg(long, conflicts_with_all = ["cert", "cert_key", "ca"])]
    key: Option<PathBuf>,
    /// This host's certificate (`godwit ca issue`); with --cert-key and --ca.
    #[arg(long, requires_all = ["cert_key", "ca"])]
    cert: Option<PathBuf>,
    /// This host's certificate's private key (mode 600).
    #[arg(long, requires_all = ["cert", "ca"])]
    cert_key: Option<PathBuf>,
    /// The CA certificate both hosts' certificates come from (`godwit ca new`).
    #[arg(long, requires_all = ["cert", "cert_key"])]
    ca: Option<PathBuf>,
    /// Send TCP data streams unencrypted (still authenticated) on a trusted network; both
    /// hosts must agree. The control channel is always encrypted.
    #[arg(long)]
    no_encrypt: bool,
}

impl AuthArgs {
    /// The files, as absolute paths (the VM's process may run elsewhere in the tree).
    fn files(&self) -> Result<AuthFiles> {
        let abs = |p: &PathBuf| std::path::absolute(p).context("a path");
        Ok(match (&self.key, &self.cert, &self.cert_key, &self.ca) {
            (Some(k), ..) => AuthFiles::Key(abs(k)?),
            (None, Some(cert), Some(key), Some(ca)) => AuthFiles::Certificate {
                cert: abs(cert)?,
                key: abs(key)?,
                ca: abs(ca)?,
            },
            _ => bail!("give --key FILE, or --cert, --cert-key and --ca"),
        })
    }

    fn options(&self) -> Result<AuthOptions> {
        Ok(AuthOptions {
            credentials: self.files()?.load()?,
            encrypt_data: !self.no_encrypt,
        })
    }
}

fn parse_migration_id(s: &str) -> std::result::Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if ok {
        Ok(s.to_string())
    } else {
        Err("a migration id is 1 to 64 letters, digits, '.', '_' or '-'".into())
    }
}

/// Where and how to move a VM: `send` and `forecast` take the same.
#[derive(clap::Args, Debug)]
struct MoveArgs {
    /// The VM's API socket.
    #[arg(long)]
    api: PathBuf,
    /// Destination, HOST:PORT.
    #[arg(long)]
    to: String,
    /// The migration id the receiver was started with (or printed).
    #[arg(long, value_parser = parse_migration_id)]
    id: String,
    #[command(flatten)]
    auth: AuthArgs,
    /// Parallel data streams.
    #[arg(long, default_value_t = 2)]
    streams: usize,
    /// Threads that read, zero-check and compress pages.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Compress pages: auto decides from measured link and compression rates.
    #[arg(long, value_enum, default_value = "auto")]
    compress: CompressMode,
    /// Longest acceptable pause of the guest.
    #[arg(long, default_value = "50ms", value_parser = units::parse_duration)]
    max_downtime: Duration,
    /// Most pre-copy rounds before giving up (default: no limit; the deadline rules).
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Longest the whole migration may take before it gives up and the VM runs on here
    /// (default: 150 s per GiB of guest RAM, at least 60 s).
    #[arg(long, value_parser = units::parse_duration)]
    deadline: Option<Duration>,
    /// Let Godwit slow the guest's vCPUs down (in 10 ms slices) when it dirties memory
    /// faster than pre-copy can catch up.
    #[arg(long)]
    allow_throttle: bool,
    /// Let Godwit hand the VM over before all of its memory has crossed, when pre-copy
    /// (throttled, if allowed) cannot converge in time; the destination fetches the rest on
    /// demand. A failure of either host or the link until then loses the guest's newest
    /// state (see the README). TCP data plane only.
    #[arg(long)]
    allow_postcopy: bool,
    /// Cap on the transfer rate, e.g. 100M (bytes per second).
    #[arg(long, value_parser = units::parse_size)]
    max_bandwidth: Option<u64>,
    /// How long to wait for each answer of the destination, and for a stream that makes
    /// no progress, before the migration fails (and the VM runs on here).
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    reply_timeout: Duration,
    /// Data plane: auto uses RDMA when both hosts have a device for the addresses in use,
    /// and says why when it falls back to TCP.
    #[arg(long, value_enum, default_value = "auto")]
    transport: TransportMode,
}

impl MoveArgs {
    /// The request the VM's process runs; checks what can be checked here first.
    fn request(&self) -> Result<MigrateRequest> {
        if self.streams == 0 || self.streams > 64 || self.threads == 0 || self.threads > 64 {
            bail!("--streams and --threads take 1 to 64");
        }
        // Checked here for a quick, clear error; the VM's process reads the key itself.
        self.auth.options()?;
        Ok(MigrateRequest {
            to: self.to.clone(),
            migration_id: self.id.clone(),
            auth: self.auth.files()?,
            encrypt_data: !self.auth.no_encrypt,
            reply_timeout_ms: self.reply_timeout.as_millis() as u64,
            streams: self.streams,
            threads: self.threads,
            compress: self.compress,
            max_downtime_ms: self.max_downtime.as_millis() as u64,
            max_rounds: self.max_rounds,
            deadline_ms: self.deadline.map(|d| d.as_millis() as u64),
            allow_throttle: self.allow_throttle,
            allow_postcopy: self.allow_postcopy,
            max_bandwidth: self.max_bandwidth,
            transport: self.transport,
        })
    }
}

/// Options of a process that hosts a VM.
#[derive(clap::Args, Debug)]
struct HostArgs {
    /// Unix socket for `godwit send`, `status`, `cancel`, `stop`.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Append the guest's serial output, each line stamped with host time, to this file
    /// (default: standard output).
    #[arg(long)]
    serial: Option<PathBuf>,
}

/// Runs the command line; returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. } | Command::Receive { .. }) {
        die_on_closed_pipe();
    }
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("godwit: error: {}", chain(&e));
            2
        }
    }
}

/// Lets a command that only prints end quietly, as Unix tools do, when what reads its output
/// goes away (`godwit status | grep -q running`): Rust ignores SIGPIPE, and `println!` would
/// panic on the broken pipe. A process that owns a VM keeps ignoring it: a closed socket or
/// pipe must never take the guest down.
fn die_on_closed_pipe() {
    // SAFETY: restoring the default action of a signal touches no memory of this process; it
    // runs before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The error and its causes, each once: Godwit's messages already quote the underlying error
/// they wrap, so a cause whose text is already shown is skipped.
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !text.contains(&c) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&c);
        }
    }
    text
}

fn dispatch(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Run {
            guest,
            kernel,
            cmdline,
            memory,
            cpus,
            host,
        } => {
            let (image, cmdline) = match (guest, kernel) {
                (Some(g), None) => {
                    let mode = match g {
                        Guest::Memcheck => "mode=check",
                        Guest::Dirtier => "mode=dirty",
                    };
                    (
                        godwit_guests::TESTGUEST_ELF.to_vec(),
                        format!("{mode} {cmdline}"),
                    )
                }
                (None, Some(path)) => (
                    std::fs::read(&path)
                        .with_context(|| format!("cannot read the image {}", path.display()))?,
                    cmdline,
                ),
                _ => bail!("give a guest to boot: --guest memcheck|dirtier or --kernel FILE"),
            };
            let layout = MemoryLayout::for_size(memory)?;
            let config = VmConfig {
                vcpus: cpus,
                layout,
                tsc_khz: None,
            };
            let vm = Vm::boot(
                &config,
                &image,
                cmdline.trim(),
                serial_sink(host.serial.as_deref())?,
            )?;
            vm.resume()?;
            eprintln!(
                "godwit: VM running ({} MiB, {} vCPU){}",
                memory >> 20,
                cpus,
                host.api
                    .as_ref()
                    .map(|p| format!(", API at {}", p.display()))
                    .unwrap_or_default()
            );
            serve(vm, host.api.as_deref())
        }
        Command::Receive {
            listen,
            accept_timeout,
            max_memory,
            idle_timeout,
            id,
            auth,
            host,
        } => {
            let auth = auth.options()?;
            let migration_id = match id {
                Some(id) => id,
                None => secure::random_id()?,
            };
            let mut listener = TcpListener::bind(&listen)?;
            eprintln!(
                "godwit: waiting for a VM on {} (migration id {migration_id}, {})",
                listener.local_addr(),
                auth.credentials.describe()
            );
            let opts = ReceiveOptions {
                accept_timeout,
                idle_timeout,
                auth,
                migration_id,
                max_memory,
            };
            let (vm, received) = match destination::receive(&mut listener, &opts, serial_sink(host.serial.as_deref())?) {
                Ok(v) => v,
                // Its message says where the guest is: the VM ran here, and is stopped.
                Err(e @ MigrationError::PostCopyLost(_)) => return Err(e.into()),
                Err(e) => return Err(anyhow::Error::new(e).context(
                    "the incoming migration failed; nothing runs here, the VM keeps running on its source",
                )),
            };
            eprintln!(
                "godwit: VM received over {} ({} MiB, {} rounds, {:.0} ms) and running here",
                received.transport,
                received.guest_memory_bytes >> 20,
                received.rounds,
                received.total.as_secs_f64() * 1e3
            );
            serve(vm, host.api.as_deref())
        }
        Command::Send { to, json } => {
            let mut client = Client::connect(&to.api)?;
            client.send(&Request::Migrate(to.request()?))?;
            let mut bar = render::ProgressBar::new(!json);
            loop {
                match client.next_event()? {
                    Some(Event::Progress(p)) => bar.update(&p),
                    Some(Event::Report(r)) => {
                        bar.finish();
                        if json {
                            println!("{}", serde_json::to_string(&r)?);
                        } else {
                            render::print_report(&r);
                        }
                        return Ok(if r.outcome == Outcome::Completed {
                            0
                        } else {
                            1
                        });
                    }
                    Some(Event::Error { message }) => bail!("{message}"),
                    Some(_) => {}
                    None => bail!(
                        "the VM process closed the connection before reporting; check its log"
                    ),
                }
            }
        }
        Command::Forecast { to, sample, json } => {
            let mut client = Client::connect(&to.api)?;
            client.send(&Request::Forecast {
                migrate: to.request()?,
                sample_ms: sample.as_millis() as u64,
            })?;
            match client.next_event()? {
                Some(Event::Forecast(f)) => {
                    if json {
                        println!("{}", serde_json::to_string(&f)?);
                    } else {
                        render::print_forecast(&f);
                    }
                    Ok(0)
                }
                Some(Event::Error { message }) => bail!("{message}"),
                Some(other) => bail!("unexpected answer {other:?}"),
                None => {
                    bail!("the VM process closed the connection before answering; check its log")
                }
            }
        }
        Command::Status { api } => {
            let ev = request(&api, Request::Status)?;
            println!("{}", serde_json::to_string_pretty(&ev)?);
            Ok(0)
        }
        Command::Cancel { api } => match request(&api, Request::Cancel)? {
            Event::Ok => {
                println!("cancel requested; the VM stays on its source");
                Ok(0)
            }
            Event::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer {other:?}"),
        },
        Command::Resume { api } => match request(&api, Request::Resume)? {
            Event::Ok => {
                println!("the VM runs here again");
                Ok(0)
            }
            Event::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer {other:?}"),
        },
        Command::Stop { api } => {
            request(&api, Request::Stop)?;
            println!("VM stopped");
            Ok(0)
        }
        Command::Heartbeat { logs, json } => {
            let texts = logs
                .iter()
                .map(|p| {
                    std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let s = heartbeat::analyse(&refs);
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                render::print_heartbeat(&s);
            }
            Ok(if s.healthy() { 0 } else { 1 })
        }
        Command::Linktest {
            listen,
            to,
            streams,
            duration,
            key,
            json,
        } => {
            let auth = key
                .map(|k| {
                    Ok::<_, anyhow::Error>(AuthOptions {
                        credentials: Credentials::Key(Psk::from_file(&k)?),
                        encrypt_data: true,
                    })
                })
                .transpose()?;
            let transport = TcpTransport;
            let (role, result) = match (listen, to) {
                (Some(addr), None) => {
                    let mut l = transport.listen(&addr)?;
                    eprintln!("godwit: link test listening on {}", l.local_addr());
                    let mut conn = l.accept(Duration::from_secs(120))?;
                    if let Some(auth) = &auth {
                        conn = secure::server(conn, auth)?;
                    }
                    ("receive", probe::receive(conn, LINKTEST_LIMIT)?)
                }
                (None, Some(addr)) => {
                    if duration >= LINKTEST_LIMIT {
                        bail!("--duration must be below {LINKTEST_LIMIT:?}");
                    }
                    let n = std::num::NonZeroUsize::new(streams)
                        .context("--streams must be at least 1")?;
                    let mut conn = transport.connect(&addr, n, &Default::default())?;
                    if let Some(auth) = &auth {
                        conn = secure::client(conn, auth)?;
                    }
                    ("send", probe::send(conn, duration)?)
                }
                _ => bail!("give --listen HOST:PORT on one host and --to HOST:PORT on the other"),
            };
            let gbps = result.bytes_per_sec() * 8.0 / 1e9;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"role": role, "streams": result.streams, "bytes": result.bytes,
                        "seconds": result.elapsed.as_secs_f64(), "bytes_per_sec": result.bytes_per_sec()})
                );
            } else {
                println!(
                    "{role}: {} MiB in {:.2} s = {:.2} Gb/s ({:.0} MiB/s) over {} stream(s)",
                    result.bytes >> 20,
                    result.elapsed.as_secs_f64(),
                    gbps,
                    result.bytes_per_sec() / (1u64 << 20) as f64,
                    result.streams
                );
            }
            Ok(0)
        }
        Command::Ca {
            action: CaAction::New { dir },
        } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let (cert, key) = secure::new_ca()?;
            write_new(&dir.join("ca.key"), &key, true)?;
            write_new(&dir.join("ca.pem"), &cert, false)?;
            println!(
                "CA written to {}: give ca.pem to every host (--ca), keep ca.key here",
                dir.display()
            );
            Ok(0)
        }
        Command::Ca {
            action:
                CaAction::Issue {
                    ca_dir,
                    ip,
                    dns,
                    out,
                },
        } => {
            let ca_key = ca_dir.join("ca.key");
            secure::check_private(&ca_key)?;
            let ca_key = std::fs::read_to_string(&ca_key)
                .with_context(|| format!("cannot read {}", ca_key.display()))?;
            let names: Vec<String> = ip.iter().map(|i| i.to_string()).chain(dns).collect();
            let (cert, key) = secure::issue(&ca_key, &names)?;
            let with = |ext: &str| {
                let mut p = out.clone().into_os_string();
                p.push(ext);
                PathBuf::from(p)
            };
            write_new(&with(".key"), &key, true)?;
            write_new(&with(".pem"), &cert, false)?;
            println!(
                "certificate for {} written to {}.pem (--cert) and {}.key (--cert-key)",
                names.join(", "),
                out.display(),
                out.display()
            );
            Ok(0)
        }
        Command::Key {
            action: KeyAction::New { file },
        } => {
            let key = Psk::generate()?;
            write_new(&file, &key.to_file_text(), true)?;
            println!(
                "key {} written to {}; copy it to the other host (keep it mode 600)",
                key.fingerprint(),
                file.display()
            );
            Ok(0)
        }
        Command::ExportGuest { out } => {
            std::fs::write(&out, godwit_guests::TESTGUEST_ELF)
                .with_context(|| format!("cannot write {}", out.display()))?;
            Ok(0)
        }
    }
}

fn request(api: &Path, req: Request) -> Result<Event> {
    let mut client = Client::connect(api)?;
    client.send(&req)?;
    client
        .next_event()?
        .context("the VM process closed the connection without answering")
}

fn serial_sink(path: Option<&Path>) -> Result<SerialSink> {
    Ok(match path {
        Some(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open the serial log {}", p.display()))?,
        ),
        None => Box::new(LineStdout),
    })
}

/// Standard output, flushed per line so that an observer sees heartbeats as they happen.
struct LineStdout;

impl Write for LineStdout {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().lock().write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}

fn serve(vm: Vm, api: Option<&Path>) -> Result<i32> {
    let transport: &dyn Transport = &TcpTransport;
    match agent::serve(vm, api, transport)? {
        AgentExit::GuestExit(code) => {
            eprintln!("godwit: the guest exited with status {code}");
            Ok(i32::from(code))
        }
        AgentExit::Crashed(why) => bail!("the VM crashed: {why}"),
        AgentExit::Migrated(r) => {
            eprintln!(
                "godwit: the VM now runs on the destination (pause {:.1} ms); released here",
                r.downtime_ms
            );
            Ok(0)
        }
        AgentExit::Stopped => {
            eprintln!("godwit: VM stopped by request");
            Ok(0)
        }
    }
}
