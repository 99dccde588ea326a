//! The VM's port-I/O devices: a COM1 16550 UART whose lines reach the host stamped with host
//! time, and a QEMU isa-debug-exit compatible port through which the guest ends the VM.
//!
//! The UART never makes the guest wait: its transmitter is always empty (an unbounded FIFO on
//! the host side), so a guest need not poll the line status per character. Every port access
//! costs a VM exit (30-40 µs on the nested KVM of our CI machines), so fewer is better.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports COM1 decodes.
const COM1_PORTS: u16 = 8;
/// The debug-exit port (QEMU `-device isa-debug-exit,iobase=0xf4`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Longest line kept before it is flushed without a newline, so a guest that never prints
/// `\n` cannot grow the buffer without bound.
const MAX_LINE: usize = 512;

const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TX_IDLE: u8 = 0x40;
const IIR_NO_INTERRUPT: u8 = 0x01;
const LCR_DLAB: u8 = 0x80;

/// Where finished serial lines go.
pub type SerialSink = Box<dyn Write + Send>;

/// The guest-visible state of the UART, migrated with the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    /// A line the guest has begun but not finished; it is finished on the destination.
    partial_line: Vec<u8>,
}

/// COM1.
pub struct Serial {
    state: SerialState,
    sink: SerialSink,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.state)
            .finish()
    }
}

impl Serial {
    /// A UART whose lines go to `sink`.
    pub fn new(sink: SerialSink) -> Self {
        Self {
            state: SerialState::default(),
            sink,
        }
    }

    /// Whether `port` belongs to this device.
    pub fn claims(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    /// A guest write.
    pub fn write(&mut self, port: u16, value: u8) {
        let s = &mut self.state;
        let dlab = s.lcr & LCR_DLAB != 0;
        match port - COM1_BASE {
            0 if dlab => s.dll = value,
            0 => self.transmit(value),
            1 if dlab => s.dlm = value,
            1 => s.ier = value & 0x0f,
            3 => s.lcr = value,
            4 => s.mcr = value,
            7 => s.scr = value,
            _ => {}
        }
    }

    /// A guest read.
    pub fn read(&self, port: u16) -> u8 {
        let s = &self.state;
        let dlab = s.lcr & LCR_DLAB != 0;
        match port - COM1_BASE {
            0 if dlab => s.dll,
            1 if dlab => s.dlm,
            1 => s.ier,
            2 => IIR_NO_INTERRUPT,
            3 => s.lcr,
            4 => s.mcr,
            5 => LSR_THR_EMPTY | LSR_TX_IDLE,
            // Carrier detect, data set ready and clear to send: a cable is attached.
            6 => 0xb0,
            7 => s.scr,
            _ => 0,
        }
    }

    fn transmit(&mut self, byte: u8) {
        match byte {
            b'\n' => self.flush_line(),
            b'\r' => {}
            b => {
                self.state.partial_line.push(b);
                if self.state.partial_line.len() >= MAX_LINE {
                    self.flush_line();
                }
            }
        }
    }

    /// Writes the current line to the sink stamped with host time (seconds since the Unix
    /// epoch, microsecond resolution) so that logs from two hosts merge into one timeline.
    fn flush_line(&mut self) {
        let line = std::mem::take(&mut self.state.partial_line);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&line);
        // A broken sink (a closed pipe) must not stop the guest; the line is dropped.
        let _ = writeln!(
            self.sink,
            "[{}.{:06}] {}",
            now.as_secs(),
            now.subsec_micros(),
            text
        );
        let _ = self.sink.flush();
    }

    /// The state to migrate.
    pub fn state(&self) -> SerialState {
        self.state.clone()
    }

    /// Takes over the state of the source's UART.
    pub fn restore(&mut self, state: SerialState) {
        self.state = state;
        self.state.partial_line.truncate(MAX_LINE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_stamped_and_partial_lines_migrate() {
        let out = Shared::default();
        let mut a = Serial::new(Box::new(out.clone()));
        for b in b"hb seq=1\nhb se" {
            a.write(COM1_BASE, *b);
        }
        let mut b = Serial::new(Box::new(out.clone()));
        b.restore(a.state());
        for c in b"q=2\n" {
            b.write(COM1_BASE, *c);
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with('[') && lines[0].ends_with("] hb seq=1"));
        assert!(lines[1].ends_with("] hb seq=2"));
        assert_eq!(a.read(COM1_BASE + 5) & LSR_THR_EMPTY, LSR_THR_EMPTY);
    }
}
