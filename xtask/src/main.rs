//! Project automation (placeholder; filled by the foundation issue).
fn main() -> anyhow::Result<()> {
    anyhow::bail!("xtask: no task given")
}
