pub async fn run(_a: crate::cli::SoakArgs) -> anyhow::Result<bool> { anyhow::bail!("soak: not yet") }
