//! The sponsor catalogue the simulated fleet plays from.
//!
//! Why a fixed list rather than random names: the per-sponsor summary the demo
//! prints must be readable by a person ("Coca-Cola: 812 impressions"), and the
//! filenames must look like what the clubs really upload
//! (`sponsor_coca_cola_30s.mp4`), because attribution in the database goes
//! through `sponsor_of(video_id, filename)` with filename globs, exactly as in
//! production. One club video belongs to no sponsor, so the summary also shows
//! how unattributed plays are reported.
//!
//! Popularity is skewed (Zipf-like): the first sponsors of the list are played
//! far more often than the last ones, as in a real league where a few main
//! partners buy most of the screen time.

/// One video file of the catalogue.
#[derive(Clone, Debug, PartialEq)]
pub struct Video {
    /// Sponsor id (`None`: a club video no sponsor pays for).
    pub sponsor_id: Option<&'static str>,
    /// The file name the TV box reports, e.g. `sponsor_coca_cola_30s.mp4`.
    pub filename: String,
    /// Length in seconds.
    pub duration_s: f64,
    /// Relative play weight (popularity).
    pub weight: f64,
}

/// One sponsor.
#[derive(Clone, Debug, PartialEq)]
pub struct Sponsor {
    /// Id in the `sponsors` table.
    pub id: &'static str,
    pub name: &'static str,
    /// The filename glob that attributes its videos (`sponsor_coca_cola_*`).
    pub pattern: String,
}

/// Sponsors, most popular first: (id, display name, video lengths in seconds).
const SPONSORS: &[(&str, &str, &[u32])] = &[
    ("coca_cola", "Coca-Cola", &[30, 15]),
    ("decathlon", "Decathlon", &[30, 20]),
    ("credit_agricole", "Crédit Agricole", &[45]),
    ("intersport", "Intersport", &[20, 10]),
    ("orange", "Orange", &[30]),
    ("renault", "Renault", &[60, 30]),
    ("carrefour", "Carrefour", &[15]),
    ("la_poste", "La Poste", &[20]),
    ("red_bull", "Red Bull", &[30]),
    ("boulangerie_martin", "Boulangerie Martin", &[10]),
    ("garage_dupont", "Garage Dupont", &[15]),
    ("pharmacie_centrale", "Pharmacie Centrale", &[10]),
];

/// The club's own video, attributed to no sponsor.
const CLUB_VIDEO: (&str, u32) = ("club_presentation_20s.mp4", 20);

/// The whole catalogue: sponsors and the videos the boxes loop.
#[derive(Clone, Debug)]
pub struct Catalogue {
    pub sponsors: Vec<Sponsor>,
    pub videos: Vec<Video>,
}

impl Default for Catalogue {
    fn default() -> Self {
        Self::standard()
    }
}

impl Catalogue {
    /// The standard catalogue (12 sponsors, 18 sponsor videos, 1 club video).
    pub fn standard() -> Self {
        let mut sponsors = Vec::new();
        let mut videos = Vec::new();
        for (rank, (id, name, lengths)) in SPONSORS.iter().enumerate() {
            sponsors.push(Sponsor {
                id,
                name,
                pattern: format!("sponsor_{id}_*"),
            });
            // Zipf with exponent 1.1 over the sponsor rank, split between its videos.
            let sponsor_weight = 1.0 / ((rank + 1) as f64).powf(1.1);
            for (i, len) in lengths.iter().enumerate() {
                // The first video of a sponsor is its main spot: played twice as often.
                let share = if lengths.len() == 1 {
                    1.0
                } else if i == 0 {
                    2.0 / 3.0
                } else {
                    1.0 / 3.0
                };
                videos.push(Video {
                    sponsor_id: Some(id),
                    filename: format!("sponsor_{id}_{len}s.mp4"),
                    duration_s: f64::from(*len),
                    weight: sponsor_weight * share,
                });
            }
        }
        videos.push(Video {
            sponsor_id: None,
            filename: CLUB_VIDEO.0.to_owned(),
            duration_s: f64::from(CLUB_VIDEO.1),
            weight: 0.08,
        });
        Self { sponsors, videos }
    }

    /// Display name of a sponsor id.
    pub fn sponsor_name(&self, id: &str) -> Option<&'static str> {
        self.sponsors.iter().find(|s| s.id == id).map(|s| s.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_look_like_the_seed_and_match_their_sponsor_glob() {
        let c = Catalogue::standard();
        assert!(c.videos.iter().any(|v| v.filename == "sponsor_coca_cola_30s.mp4"));
        for v in &c.videos {
            if let Some(s) = v.sponsor_id {
                assert!(v.filename.starts_with(&format!("sponsor_{s}_")), "{}", v.filename);
            }
            assert!(v.duration_s > 0.0);
        }
        assert_eq!(c.sponsor_name("coca_cola"), Some("Coca-Cola"));
        let top = c.videos[0].weight;
        let last = c.videos.iter().rev().find(|v| v.sponsor_id.is_some()).unwrap().weight;
        assert!(top > 5.0 * last, "popularity is skewed");
    }
}
