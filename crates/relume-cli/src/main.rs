//! The `relume` command-line tool.
fn main() {
    println!("relume {}", env!("CARGO_PKG_VERSION"));
}
