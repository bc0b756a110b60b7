pub async fn run(_a: crate::cli::BenchArgs) -> anyhow::Result<bool> { anyhow::bail!("bench: not yet") }
