//! The sponsor catalogue: sponsors and the rules that attribute videos to
//! them (an explicit `video_id`, or a filename glob such as
//! `sponsor_coca_cola_*`), stored in the `sponsors` and `videos` tables of
//! the schema crate.
//!
//! Attribution itself is not stored anywhere: the stats join through the SQL
//! function `sponsor_of(video_id, filename)` at read time, so adding,
//! moving or deleting a rule re-attributes past plays too.
//!
//! Bulk import (CSV or TOML) runs in one transaction: a file either applies
//! whole or not at all. Sponsors are upserted (name updated); a rule that
//! already exists for another sponsor is moved to the one the file names.

use crate::error::{ApiError, ApiResult};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sponsor {
    pub id: String,
    pub name: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, sqlx::FromRow)]
pub struct VideoRule {
    pub id: i64,
    pub sponsor_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename_pattern: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// Body of `POST /api/sponsors/:id/videos`: exactly one of the two keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRule {
    pub video_id: Option<String>,
    pub filename_pattern: Option<String>,
    pub title: Option<String>,
}

pub fn validate_sponsor_id(id: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad("id", "must be 1-64 characters among A-Z a-z 0-9 _ . -"))
    }
}

pub fn validate_sponsor(s: &Sponsor) -> ApiResult<()> {
    validate_sponsor_id(&s.id)?;
    let n = s.name.trim();
    if n.is_empty() || n.chars().count() > 200 {
        return Err(ApiError::bad("name", "must be 1-200 characters"));
    }
    Ok(())
}

impl NewRule {
    pub fn validate(&self) -> ApiResult<()> {
        match (&self.video_id, &self.filename_pattern) {
            (Some(v), None) if (1..=128).contains(&v.len()) => {}
            (Some(_), None) => return Err(ApiError::bad("video_id", "must be 1-128 bytes")),
            (None, Some(p)) if (1..=255).contains(&p.len()) => {}
            (None, Some(_)) => return Err(ApiError::bad("filename_pattern", "must be 1-255 bytes")),
            _ => {
                return Err(ApiError::bad(
                    "video_id",
                    "give exactly one of video_id or filename_pattern",
                ))
            }
        }
        if let Some(t) = &self.title {
            if t.chars().count() > 200 {
                return Err(ApiError::bad("title", "must be at most 200 characters"));
            }
        }
        Ok(())
    }
}

pub async fn get_sponsor(pool: &PgPool, id: &str) -> ApiResult<Sponsor> {
    let row: Option<(String, String)> = sqlx::query_as("SELECT id, name FROM sponsors WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(|(id, name)| Sponsor { id, name })
        .ok_or_else(|| ApiError::NotFound(format!("unknown sponsor '{id}'")))
}

pub async fn list_sponsors(pool: &PgPool) -> ApiResult<Vec<Sponsor>> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM sponsors ORDER BY id")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(id, name)| Sponsor { id, name }).collect())
}

/// Creates a sponsor; 409 when the id exists.
pub async fn create_sponsor(pool: &PgPool, s: &Sponsor) -> ApiResult<()> {
    validate_sponsor(s)?;
    let r = sqlx::query("INSERT INTO sponsors (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
        .bind(&s.id)
        .bind(s.name.trim())
        .execute(pool)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!("sponsor '{}' already exists", s.id)));
    }
    Ok(())
}

pub async fn rename_sponsor(pool: &PgPool, s: &Sponsor) -> ApiResult<()> {
    validate_sponsor(s)?;
    let r = sqlx::query("UPDATE sponsors SET name = $2 WHERE id = $1")
        .bind(&s.id)
        .bind(s.name.trim())
        .execute(pool)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!("unknown sponsor '{}'", s.id)));
    }
    Ok(())
}

/// Deletes a sponsor and its rules (its plays become unattributed).
pub async fn delete_sponsor(pool: &PgPool, id: &str) -> ApiResult<()> {
    let r = sqlx::query("DELETE FROM sponsors WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!("unknown sponsor '{id}'")));
    }
    Ok(())
}

pub async fn list_rules(pool: &PgPool, sponsor_id: &str) -> ApiResult<Vec<VideoRule>> {
    get_sponsor(pool, sponsor_id).await?;
    Ok(sqlx::query_as(
        "SELECT id, sponsor_id, video_id, filename_pattern, title FROM videos WHERE sponsor_id = $1 ORDER BY id",
    )
    .bind(sponsor_id)
    .fetch_all(pool)
    .await?)
}

/// Adds a rule; 409 when the same video_id/pattern already belongs to a sponsor.
pub async fn add_rule(pool: &PgPool, sponsor_id: &str, rule: &NewRule) -> ApiResult<VideoRule> {
    rule.validate()?;
    get_sponsor(pool, sponsor_id).await?;
    let r = sqlx::query_as::<_, VideoRule>(
        "INSERT INTO videos (sponsor_id, video_id, filename_pattern, title) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING
         RETURNING id, sponsor_id, video_id, filename_pattern, title",
    )
    .bind(sponsor_id)
    .bind(&rule.video_id)
    .bind(&rule.filename_pattern)
    .bind(&rule.title)
    .fetch_optional(pool)
    .await?;
    r.ok_or_else(|| {
        let what = rule
            .video_id
            .as_ref()
            .map(|v| format!("video_id '{v}'"))
            .or_else(|| {
                rule.filename_pattern
                    .as_ref()
                    .map(|p| format!("filename_pattern '{p}'"))
            })
            .unwrap_or_default();
        ApiError::Conflict(format!("{what} is already attributed to a sponsor"))
    })
}

pub async fn delete_rule(pool: &PgPool, sponsor_id: &str, rule_id: i64) -> ApiResult<()> {
    let r = sqlx::query("DELETE FROM videos WHERE id = $1 AND sponsor_id = $2")
        .bind(rule_id)
        .bind(sponsor_id)
        .execute(pool)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!(
            "no rule {rule_id} for sponsor '{sponsor_id}'"
        )));
    }
    Ok(())
}

/// A catalogue file, parsed.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    #[serde(default)]
    pub sponsors: Vec<CatalogueSponsor>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CatalogueSponsor {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub video_ids: Vec<String>,
    #[serde(default)]
    pub filename_patterns: Vec<String>,
}

/// What an import changed.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ImportReport {
    pub sponsors: u64,
    pub rules: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatalogueFormat {
    Csv,
    Toml,
}

/// Parses a catalogue. TOML:
/// ```toml
/// [[sponsors]]
/// id = "coca-cola"
/// name = "Coca-Cola"
/// video_ids = ["vid-123"]
/// filename_patterns = ["sponsor_coca_cola_*"]
/// ```
/// CSV (header required): `sponsor_id,sponsor_name,video_id,filename_pattern`,
/// one rule per line (a line with neither only declares the sponsor).
/// Errors name the line/field.
pub fn parse_catalogue(text: &str, format: CatalogueFormat) -> ApiResult<Catalogue> {
    let cat = match format {
        CatalogueFormat::Toml => {
            toml::from_str::<Catalogue>(text).map_err(|e| ApiError::bad("catalogue", e.to_string()))?
        }
        CatalogueFormat::Csv => {
            #[derive(Deserialize)]
            struct Line {
                sponsor_id: String,
                sponsor_name: String,
                #[serde(default)]
                video_id: Option<String>,
                #[serde(default)]
                filename_pattern: Option<String>,
            }
            let mut rdr = csv::ReaderBuilder::new()
                .trim(csv::Trim::All)
                .from_reader(text.as_bytes());
            let mut cat = Catalogue::default();
            for (i, rec) in rdr.deserialize::<Line>().enumerate() {
                let l = rec.map_err(|e| ApiError::bad("catalogue", format!("CSV line {}: {e}", i + 2)))?;
                let idx = match cat.sponsors.iter().position(|s| s.id == l.sponsor_id) {
                    Some(i) => i,
                    None => {
                        cat.sponsors.push(CatalogueSponsor {
                            id: l.sponsor_id.clone(),
                            name: l.sponsor_name.clone(),
                            ..Default::default()
                        });
                        cat.sponsors.len() - 1
                    }
                };
                let s = &mut cat.sponsors[idx];
                s.name = l.sponsor_name;
                match (
                    l.video_id.filter(|v| !v.is_empty()),
                    l.filename_pattern.filter(|v| !v.is_empty()),
                ) {
                    (Some(_), Some(_)) => {
                        return Err(ApiError::bad(
                            "catalogue",
                            format!("CSV line {}: give video_id or filename_pattern, not both", i + 2),
                        ))
                    }
                    (Some(v), None) => s.video_ids.push(v),
                    (None, Some(p)) => s.filename_patterns.push(p),
                    (None, None) => {}
                }
            }
            cat
        }
    };
    for s in &cat.sponsors {
        validate_sponsor(&Sponsor {
            id: s.id.clone(),
            name: s.name.clone(),
        })
        .map_err(|e| ApiError::bad("catalogue", format!("sponsor '{}': {e}", s.id)))?;
        for v in &s.video_ids {
            NewRule {
                video_id: Some(v.clone()),
                filename_pattern: None,
                title: None,
            }
            .validate()
            .map_err(|e| ApiError::bad("catalogue", format!("sponsor '{}': {e}", s.id)))?;
        }
        for p in &s.filename_patterns {
            NewRule {
                video_id: None,
                filename_pattern: Some(p.clone()),
                title: None,
            }
            .validate()
            .map_err(|e| ApiError::bad("catalogue", format!("sponsor '{}': {e}", s.id)))?;
        }
    }
    Ok(cat)
}

/// Applies a catalogue in one transaction.
pub async fn import(pool: &PgPool, cat: &Catalogue) -> ApiResult<ImportReport> {
    let mut tx = pool.begin().await?;
    let mut report = ImportReport::default();
    for s in &cat.sponsors {
        report.sponsors += sqlx::query(
            "INSERT INTO sponsors (id, name) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name WHERE sponsors.name <> excluded.name",
        )
        .bind(&s.id)
        .bind(s.name.trim())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        for v in &s.video_ids {
            report.rules += sqlx::query(
                "INSERT INTO videos (sponsor_id, video_id) VALUES ($1, $2)
                 ON CONFLICT (video_id) DO UPDATE SET sponsor_id = excluded.sponsor_id
                 WHERE videos.sponsor_id <> excluded.sponsor_id",
            )
            .bind(&s.id)
            .bind(v)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        for p in &s.filename_patterns {
            report.rules += sqlx::query(
                "INSERT INTO videos (sponsor_id, filename_pattern) VALUES ($1, $2)
                 ON CONFLICT (filename_pattern) DO UPDATE SET sponsor_id = excluded.sponsor_id
                 WHERE videos.sponsor_id <> excluded.sponsor_id",
            )
            .bind(&s.id)
            .bind(p)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
    }
    tx.commit().await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_toml_parse_to_the_same_catalogue() {
        let csv = "sponsor_id,sponsor_name,video_id,filename_pattern\n\
                   coca-cola,Coca-Cola,vid-1,\n\
                   coca-cola,Coca-Cola,,sponsor_coca_cola_*\n\
                   adidas,Adidas,,\n";
        let toml = r#"
            [[sponsors]]
            id = "coca-cola"
            name = "Coca-Cola"
            video_ids = ["vid-1"]
            filename_patterns = ["sponsor_coca_cola_*"]
            [[sponsors]]
            id = "adidas"
            name = "Adidas"
        "#;
        let a = parse_catalogue(csv, CatalogueFormat::Csv).unwrap();
        let b = parse_catalogue(toml, CatalogueFormat::Toml).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.sponsors.len(), 2);
    }

    #[test]
    fn bad_lines_are_named() {
        let e = parse_catalogue(
            "sponsor_id,sponsor_name,video_id,filename_pattern\nbad id,X,v,\n",
            CatalogueFormat::Csv,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bad id"), "{e}");
        let e = parse_catalogue(
            "sponsor_id,sponsor_name,video_id,filename_pattern\nok,X,v,p*\n",
            CatalogueFormat::Csv,
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
