//! Writes a Lightning-shaped `.ckpt` with one large float32 storage, for measuring the
//! memory and time of `relume lightning inspect` and `convert` (see
//! `scripts/measure_lightning.sh`).
//!
//! ```text
//! cargo run --release -p relume-lightning --example big_lightning_ckpt -- OUT.ckpt [MIB]
//! ```
//!
//! The file is what `torch.save` writes for `{"pytorch-lightning_version", "epoch",
//! "global_step", "state_dict": {"big.weight": <MIB MiB float32 tensor>}}`: a zip of stored
//! entries `big/data.pkl`, `big/byteorder`, `big/data/0`, `big/version`. The storage is
//! streamed to disk 1 MiB at a time. `MIB` defaults to 1024 and must be a multiple of 4
//! (rows of 1024 floats).

use std::error::Error;
use std::io::Write;

/// Columns of the weight; a row is 4 KiB.
const COLS: u64 = 1024;

/// A minimal pickle writer (protocol 2) for the few opcodes needed.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, code: u8) -> &mut Self {
        self.0.push(code);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// `LONG1`: any non-negative integer below 2^63.
    fn int(&mut self, i: u64) -> &mut Self {
        self.0.extend([0x8a, 8]);
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
}

fn pickle(rows: u64) -> Vec<u8> {
    let mut p = Pickle::default();
    p.op(0x80).op(2).op(b'}').op(b'(');
    p.str("pytorch-lightning_version").str("2.6.6");
    p.str("epoch").int(0).str("global_step").int(0);
    p.str("state_dict")
        .global("collections", "OrderedDict")
        .op(b')')
        .op(b'R');
    p.str("big.weight")
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(b'(');
    // Persistent id ('storage', torch.FloatStorage, '0', 'cpu', numel).
    p.op(b'(')
        .str("storage")
        .global("torch", "FloatStorage")
        .str("0")
        .str("cpu")
        .int(rows * COLS)
        .op(b't')
        .op(b'Q');
    p.int(0); // storage offset
    p.op(b'(').int(rows).int(COLS).op(b't'); // size
    p.op(b'(').int(COLS).int(1).op(b't'); // stride
    p.op(0x89) // requires_grad False
        .global("collections", "OrderedDict")
        .op(b')')
        .op(b'R')
        .op(b't')
        .op(b'R')
        .op(b's') // state_dict["big.weight"] = tensor
        .op(b'u') // SETITEMS on the top-level dict
        .op(b'.');
    p.0
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        return Err("usage: big_lightning_ckpt OUT.ckpt [MIB]".into());
    };
    let mib: u64 = match args.next() {
        Some(m) => m.parse()?,
        None => 1024,
    };
    if mib == 0 || mib % 4 != 0 {
        return Err(format!("MIB must be a positive multiple of 4, got {mib}").into());
    }
    let bytes = mib << 20;
    let rows = bytes / (COLS * 4);
    let file = std::fs::File::create(&out)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(bytes >= u32::MAX as u64);
    let small = opts.large_file(false);
    zip.start_file("big/data.pkl", small)?;
    zip.write_all(&pickle(rows))?;
    zip.start_file("big/byteorder", small)?;
    zip.write_all(b"little")?;
    zip.start_file("big/data/0", opts)?;
    // 1 MiB of float32 values 0, 1, 2, ... (mod 2^18), repeated.
    let chunk: Vec<u8> = (0..(1u32 << 18))
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    for _ in 0..mib {
        zip.write_all(&chunk)?;
    }
    zip.start_file("big/version", small)?;
    zip.write_all(b"3\n")?;
    zip.finish()?.flush()?;
    println!("{out}: one {rows}x{COLS} float32 storage of {bytes} bytes");
    Ok(())
}
