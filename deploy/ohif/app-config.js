// OHIF Viewer configuration for the `ohif` service of docker-compose.yml: one DICOMweb data source,
// Orthanc through the same origin's /dicom-web/ proxy (deploy/ohif/nginx.conf). The same settings
// are checked in a real browser by tests/test_ohif.py (tests/ohif_browser.py's app_config_js).
window.config = {
  "routerBasename": "/",
  "extensions": [],
  "modes": [],
  "customizationService": {},
  "showStudyList": true,
  "maxNumberOfWebWorkers": 4,
  "showWarningMessageForCrossOrigin": false,
  "showCPUFallbackMessage": false,
  "showLoadingIndicator": true,
  "strictZSpacingForVolumeViewport": true,
  "investigationalUseDialog": {
    "option": "never"
  },
  "maxNumRequests": {
    "interaction": 100,
    "thumbnail": 5,
    "prefetch": 10
  },
  "showErrorDetails": "always",
  "defaultDataSourceName": "orthanc",
  "dataSources": [
    {
      "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
      "sourceName": "orthanc",
      "configuration": {
        "friendlyName": "Orthanc",
        "name": "orthanc",
        "qidoRoot": "/dicom-web",
        "wadoRoot": "/dicom-web",
        "wadoUriRoot": "/dicom-web",
        "qidoSupportsIncludeField": false,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": true,
        "supportsFuzzyMatching": false,
        "supportsWildcard": true,
        "staticWado": false,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {
          "enabled": true,
          "relativeResolution": "studies"
        },
        "omitQuotationForMultipartRequest": true
      }
    }
  ]
};
